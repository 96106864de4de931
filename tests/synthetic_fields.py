"""Synthetic images and deformations with known answers, shared by the instance optimisation tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def blob_scene(shape: Sequence[int], seed: int = 0, blobs: int = 20, spread: tuple[float, float] = (0.2, 0.8),
               width: tuple[float, float] = (0.04, 0.09)) -> torch.Tensor:
    """(1, 1, *shape) image of Gaussian blobs on a dark background, values in [0, 1]: ``blobs`` blobs centred in
    the ``spread`` fraction of each axis, of widths ``width`` times the smallest axis."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    image = np.zeros(shape)
    for _ in range(blobs):
        centre = [rng.uniform(*spread) * n for n in shape]
        sigma = rng.uniform(*width) * min(shape)
        image += rng.uniform(0.4, 1.0) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * sigma**2))
    return torch.as_tensor(image / image.max(), dtype=torch.float32)[None, None]


def sine_field(shape: Sequence[int], amplitude_voxels: float, seed: int = 0) -> torch.Tensor:
    """(1, ndim, *shape) smooth displacement in voxels: one sine wave per component (half a period to 1.5 periods
    across the grid, random phases)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) / n for n in shape], indexing="ij")
    components = []
    for _ in shape:
        phase, k = rng.uniform(0, 2 * math.pi, len(shape)), rng.integers(0, 2, len(shape)) + 0.5
        components.append(amplitude_voxels * np.sin(sum(2 * math.pi * kk * g + p for kk, g, p in zip(k, grids, phase))))
    return torch.as_tensor(np.stack(components), dtype=torch.float32)[None]
