"""Additive Gaussian noise for the noise study (the paper's smoothness-under-noise claim).

Images are intensities in [0, 1]; noisy images are clamped back to [0, 1], as the DeepSim authors did. The noise
of one image is a function of ``(seed, key)`` alone, so every method sees exactly the same noisy pair.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["add_gaussian_noise"]


def add_gaussian_noise(image: torch.Tensor, std: float, seed: int, key: int = 0) -> torch.Tensor:
    """``clamp(image + N(0, std²), 0, 1)`` with noise drawn from ``(seed, key)``. image: (..., *S) -> same shape.

    ``std`` is in intensity units of the [0, 1] images; ``std == 0`` returns the input unchanged.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return image
    rng = np.random.default_rng([int(seed), int(key)])
    noise = torch.from_numpy(rng.standard_normal(tuple(image.shape), dtype=np.float32))
    return (image + std * noise.to(image.device, image.dtype)).clamp(0.0, 1.0)
