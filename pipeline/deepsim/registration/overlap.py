"""Overlap checks before and after registering or warping: images that do not overlap.

Resampling reads 0 outside an image, so two images placed 1 m apart in world space register "successfully" to an
all-zero result. :func:`check_overlap` turns that into a one-line error before anything is written, and a partial
overlap into one warning line: the fraction of the fixed image's points (mapped by the transform, when there is
one) that fall inside the moving image's field of view: none is a DatasetError, less than :data:`WARN_OVERLAP` a
warning. Grids of absurd size are :func:`deepsim.grid_check.check_extent`'s job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from deepsim.errors import DatasetError
from deepsim.geometry import Grid, apply_affine, grid_points

__all__ = ["WARN_OVERLAP", "inside_fraction", "check_overlap"]

#: below this fraction of overlap the result is mostly 0: warned about
WARN_OVERLAP = 0.5


def _subgrid(grid: Grid, per_axis: int = 24) -> Grid:
    """The grid's voxels subsampled to at most ``per_axis`` along each axis (same world box)."""
    step = [max(1, int(np.ceil((n - 1) / max(per_axis - 1, 1)))) for n in grid.shape]
    shape = tuple((n - 1) // s + 1 for n, s in zip(grid.shape, step))
    affine = np.array(grid.affine, dtype=np.float64)
    affine[:grid.ndim, :grid.ndim] = affine[:grid.ndim, :grid.ndim] * np.asarray(step)
    return Grid(shape, affine)


def inside_fraction(points: torch.Tensor, grid: Grid) -> float:
    """Fraction of world points (ndim, *P) that lie within half a voxel of ``grid``'s voxel-centre box."""
    ndim = grid.ndim
    to_voxel = np.linalg.inv(np.asarray(grid.affine, dtype=np.float64)[np.r_[0:ndim, 3]][:, np.r_[0:ndim, 3]])
    voxel = apply_affine(torch.as_tensor(to_voxel, device=points.device), points.double()).reshape(ndim, -1)
    upper = torch.tensor(grid.shape, dtype=voxel.dtype, device=voxel.device).view(ndim, 1) - 0.5
    inside = ((voxel >= -0.5) & (voxel <= upper)).all(dim=0)
    return float(inside.double().mean()) if inside.numel() else 0.0


def check_overlap(points: torch.Tensor | Grid, moving: Grid, moving_path: str | Path, fixed_path: str | Path,
                  transform: np.ndarray | None = None, hint: str = "", warn: bool = True) -> float:
    """The fraction of ``points`` (world points (ndim, *P), or a fixed grid, subsampled) inside ``moving``'s field
    of view, after ``transform`` (4x4 world -> world) if given. None inside: DatasetError naming both files and how
    far apart they are; less than :data:`WARN_OVERLAP` (and ``warn``): one warning line on stderr. ``hint`` ends
    the error."""
    if isinstance(points, Grid):
        points = grid_points(_subgrid(points))
    if transform is not None:
        points = apply_affine(transform, points.double())
    fraction = inside_fraction(points, moving)
    if fraction == 0.0:
        ndim = moving.ndim
        centre = points.double().reshape(ndim, -1).mean(dim=1).cpu().numpy()
        moving_centre = grid_points(_subgrid(moving, 2)).reshape(ndim, -1).mean(dim=1).numpy()
        distance = float(np.linalg.norm(centre - moving_centre))
        raise DatasetError(f"{moving_path} does not overlap {fixed_path} in world space (their centres are "
                           f"{distance:.0f} mm apart): the result would be all 0; check the headers' origins and "
                           f"units{hint}")
    if fraction < WARN_OVERLAP and warn:
        print(f"deepsim: warning: only {100 * fraction:.0f} % of {fixed_path} lies inside the field of view of "
              f"{moving_path}; the result is 0 elsewhere", file=sys.stderr, flush=True)
    return fraction
