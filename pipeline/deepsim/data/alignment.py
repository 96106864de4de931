"""Affine pre-alignment of whole subjects into one reference space, before deformable registration.

The six embedded donors live in their own native scanner spaces: brain centres differ by up to ~20 mm and mean DK
Dice between donors in world space is 0.11 (1 mm, measured with ``nibabel.processing.resample_from_to``). Learned
deformable registration is normally trained on affinely pre-aligned data (OASIS, Learn2Reg), so with
``alignment: affine`` the embedded dataset aligns every donor to a reference donor by a 12-parameter affine
transform estimated on synthesised T1-like images, and resamples image and labels onto one common grid. The
estimate comes from an :class:`Aligner` handed in by the caller — the bundle wires
:func:`deepsim.registration.affine.estimate_affine` (torch: the same on the CPU and on a GPU machine without
SimpleITK) — so the data layer stays below the registration layer. tests/test_data_alignment.py checks both
steps against SimpleITK.

Arrays here are NumPy ``(i, j, k)`` volumes with a 4x4 voxel -> RAS affine (NIfTI convention); a transform is a
4x4 RAS world -> world matrix mapping points of the reference (fixed) grid into the volume's world.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from deepsim.geometry import Grid, apply_affine, grid_points, sample_at

__all__ = ["Aligner", "reference_grid", "resample_to_grid"]


class Aligner(Protocol):
    """Estimates the 4x4 RAS world -> world matrix mapping points of the fixed volume into the moving volume."""

    def __call__(self, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                 seed: int = 0) -> np.ndarray: ...


def reference_grid(center_ras: Sequence[float], spacing_mm: float, shape: Sequence[int]) -> np.ndarray:
    """Voxel->RAS affine of an axis-aligned RAS grid of ``shape`` voxels of ``spacing_mm`` centred on ``center_ras``."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = np.asarray(center_ras, dtype=np.float64) - spacing_mm * (np.asarray(shape) - 1) / 2.0
    return affine


def resample_to_grid(array: np.ndarray, affine_ras: np.ndarray, transform: np.ndarray | None,
                     grid_affine_ras: np.ndarray, grid_shape: Sequence[int], is_label: bool) -> np.ndarray:
    """Resample a volume onto a reference grid through ``transform`` (reference point -> volume point; None: the
    identity). Linear interpolation for images (float32), nearest neighbour for label maps (values and dtype
    preserved); zero outside."""
    points = grid_points(Grid(tuple(int(n) for n in grid_shape), np.asarray(grid_affine_ras, dtype=np.float64)))
    if transform is not None:
        points = apply_affine(transform, points)
    if is_label:
        return sample_at(torch.as_tensor(np.ascontiguousarray(array)), affine_ras, points, mode="nearest").numpy()
    values = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))
    return sample_at(values, affine_ras, points).numpy()
