"""Geometry checks before and after registering or warping: images that do not overlap, grids of absurd size.

Resampling reads 0 outside an image, so two images placed 1 m apart in world space register "successfully" to an
all-zero result, and a file whose header declares the wrong voxel size (or unit) gives a working grid of a handful
of voxels or of billions. These checks turn both into one-line errors before anything is written, and a partial
overlap into one warning line:

- :func:`check_extent`: the fixed image spans at least :data:`MIN_WORKING_VOXELS` model voxels along every axis and
  its working grid holds at most :data:`MAX_WORKING_VOXELS` voxels;
- :func:`check_overlap`: the fraction of the fixed image's points (mapped by the transform, when there is one) that
  fall inside the moving image's field of view: none is a DatasetError, less than :data:`WARN_OVERLAP` a warning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from deepsim.errors import DatasetError
from deepsim.geometry import Grid, apply_affine, grid_points

__all__ = ["MIN_WORKING_VOXELS", "MAX_WORKING_VOXELS", "WARN_OVERLAP", "inside_fraction", "check_extent",
           "check_overlap"]

#: fewer model voxels than this along an axis: the header's voxel size or unit is wrong (or the image is no scan)
MIN_WORKING_VOXELS = 4
#: more working-grid voxels than this (2**28: 645^3, 23 GB for one float32 field of 3 components at 1 mm) is refused
MAX_WORKING_VOXELS = 2**28
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


def _extent_mm(grid: Grid) -> np.ndarray:
    """Side lengths (mm) of the world bounding box of the grid's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.shape], indexing="ij")).reshape(grid.ndim, -1)
    linear = np.asarray(grid.affine, dtype=np.float64)[:grid.ndim, :grid.ndim]
    world = linear @ corners
    return world.max(axis=1) - world.min(axis=1)


def check_extent(fixed: Grid, spacing_mm: float, path: str | Path) -> None:
    """DatasetError when ``fixed`` is absurdly small or large for a model of ``spacing_mm``: a wrong voxel size or
    unit in the header (a brain in metres read as millimetres spans 0.2 mm; one in microns 180 m)."""
    extent = _extent_mm(fixed)
    voxels = np.floor(extent / spacing_mm + 1e-6) + 1
    size = " x ".join(f"{e:.3g}" for e in extent)
    if voxels.min() < MIN_WORKING_VOXELS:
        raise DatasetError(f"{path}: the image spans {size} mm, less than {MIN_WORKING_VOXELS} voxels of the model's "
                           f"{spacing_mm:g} mm spacing along an axis; check the header's voxel size and units "
                           "(NIfTI xyzt_units: meter, mm or micron)")
    if float(np.prod(voxels)) > MAX_WORKING_VOXELS:
        raise DatasetError(f"{path}: the image spans {size} mm, which needs {int(np.prod(voxels)):,} voxels at the "
                           f"model's {spacing_mm:g} mm spacing (at most {MAX_WORKING_VOXELS:,}); check the header's "
                           "voxel size and units (NIfTI xyzt_units: meter, mm or micron)")


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
