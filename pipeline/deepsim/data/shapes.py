"""Random "shapes" label maps (SynthMorph's label source that needs no anatomy): argmax of warped smooth noise.

``J`` noise images, each a sum of Gaussian noise drawn on coarse grids (one per scale, spacing ``scale`` voxels) and
resized linearly to the full grid (a Perlin-like noise), are warped together by one random diffeomorphism; the
label of a voxel is the index of the largest of the ``J`` values. The result tiles the volume with smooth, irregular
blobs of labels ``0 .. J-1``. Randomness comes in as tensors (drawn by :class:`deepsim.data.synth.LabelPairSynth`),
so a map is a deterministic function of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepsim.data.random_fields import integrate_velocity, normalised_grid, resize, sample, voxels_to_normalised

__all__ = ["shapes_label_map"]


def shapes_label_map(noise: Sequence[torch.Tensor], velocity: torch.Tensor, shape: Sequence[int],
                     integration_shape: Sequence[int], steps: int = 5) -> torch.Tensor:
    """Label map (B, 1, *shape) of indices 0..J-1, long.

    noise: one (B, J, *coarse) tensor per scale, summed after resizing to ``shape``; velocity: (B, ndim, *coarse)
    in voxels of ``shape``, integrated on ``integration_shape`` (scaling and squaring, ``steps``) into the warp."""
    shape = tuple(int(n) for n in shape)
    total = sum(resize(n, shape) for n in noise)
    displacement = integrate_velocity(resize(voxels_to_normalised(velocity, shape), integration_shape), steps)
    positions = normalised_grid(shape, velocity.device) + resize(displacement, shape)
    warped = sample(total, positions, mode="bilinear", padding_mode="border")
    return warped.argmax(dim=1, keepdim=True)
