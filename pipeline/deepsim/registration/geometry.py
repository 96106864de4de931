"""Physical-space resampling for registering images of any size, spacing and orientation.

Every image is an array ``(*S)`` with a voxel -> RAS world affine (4x4, NIfTI convention; 2D images use the
top-left 2x2 block and the translation). Points are world coordinates in millimetres, RAS, shaped ``(ndim, *S)``.
One primitive does all resampling: :func:`sample_at` reads an image at world points (linear or nearest,
zero outside its field of view, as ITK's ``Resample`` with default value 0). On top of it:

- :func:`working_grid`: the axis-aligned RAS grid at the model's spacing that covers the fixed image, its size
  rounded up to what the network accepts;
- :func:`grid_points`: the world coordinates of every voxel of a grid;
- :func:`apply_affine`: a 4x4 world -> world transform applied to points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["Grid", "working_grid", "grid_points", "apply_affine", "clamp_to_grid", "sample_at", "linear_part"]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: spatial ``shape`` and its 4x4 voxel -> RAS ``affine`` (mm)."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.shape)


def linear_part(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``ndim x ndim`` linear block of a 4x4 affine (the in-plane block for 2D images)."""
    return np.asarray(affine, dtype=np.float64)[:ndim, :ndim]


def _homogeneous(affine: np.ndarray, ndim: int) -> np.ndarray:
    """(ndim+1, ndim+1) affine from a 4x4 one: linear block and translation of the first ``ndim`` axes."""
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] = linear_part(affine, ndim)
    out[:ndim, ndim] = np.asarray(affine, dtype=np.float64)[:ndim, 3]
    return out


def working_grid(fixed: Grid, spacing_mm: float | Sequence[float], multiple: int) -> Grid:
    """Axis-aligned RAS grid of ``spacing_mm`` covering every voxel centre of ``fixed``, centred on it.

    Each side is rounded up to a multiple of ``multiple`` (the network's size divisor), so the network sees the
    whole fixed field of view at its training spacing and orientation, whatever the fixed header says.
    """
    ndim = fixed.ndim
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (ndim,))
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in fixed.shape], indexing="ij")).reshape(ndim, -1)
    world = _homogeneous(fixed.affine, ndim) @ np.vstack([corners, np.ones(corners.shape[1])])
    lo, hi = world[:ndim].min(axis=1), world[:ndim].max(axis=1)
    n = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    n = (np.ceil(n / multiple) * multiple).astype(int)
    affine = np.eye(4)
    affine[np.arange(ndim), np.arange(ndim)] = spacing
    affine[:ndim, 3] = (lo + hi) / 2.0 - spacing * (n - 1) / 2.0
    return Grid(tuple(int(v) for v in n), affine)


def grid_points(grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """World coordinates (mm, RAS) of every voxel of ``grid``: (ndim, *shape) float64."""
    ndim = grid.ndim
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in grid.shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return apply_affine(torch.as_tensor(_homogeneous(grid.affine, ndim), device=device), index)


def clamp_to_grid(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Move world points (ndim, *P) outside ``grid``'s voxel-centre box onto its nearest face (border replication)."""
    ndim = grid.ndim
    to_voxel = torch.as_tensor(np.linalg.inv(_homogeneous(grid.affine, ndim)), device=points.device)
    voxel = apply_affine(to_voxel, points)
    upper = torch.tensor([n - 1 for n in grid.shape], dtype=voxel.dtype, device=voxel.device)
    voxel = torch.minimum(voxel.clamp_min(0), upper.view(-1, *[1] * (voxel.ndim - 1)))
    return apply_affine(torch.as_tensor(_homogeneous(grid.affine, ndim), device=points.device), voxel)


def apply_affine(matrix: torch.Tensor | np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """``matrix`` (ndim+1, ndim+1) applied to points (ndim, *S) -> (ndim, *S), computed in the points' dtype."""
    ndim = points.shape[0]
    dtype = points.dtype if points.is_floating_point() else torch.float64
    m = torch.as_tensor(matrix, device=points.device)
    if m.shape == (4, 4) and ndim == 2:
        m = torch.as_tensor(_homogeneous(m.cpu().numpy(), 2), device=points.device)
    m = m.to(dtype)
    shift = m[:ndim, ndim].view(-1, *[1] * (points.ndim - 1))
    return torch.einsum("ij,j...->i...", m[:ndim, :ndim], points.to(dtype)) + shift


def sample_at(image: torch.Tensor, affine: np.ndarray, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of ``image`` with voxel -> world ``affine`` at world ``points`` (ndim, *P) -> (*P) or (C, *P).

    ``image`` is (*S) or, with one extra leading axis, (C, *S) channels sampled together. ``*P`` is any layout: a
    grid (ndim, X, Y, Z) or a list of points (ndim, N). ``mode``: "bilinear" (linear in 2D and 3D, float32) or
    "nearest" (float64 throughout, so label values and voxel choices are exact). Points outside read 0.
    The image and points must be on one device.
    """
    ndim = points.shape[0]
    channels = image.ndim == ndim + 1
    if image.ndim not in (ndim, ndim + 1):
        raise ValueError(f"image has {image.ndim} axes, points have {ndim} coordinates")
    dtype = torch.float64 if mode == "nearest" else torch.float32
    world_to_voxel = torch.as_tensor(np.linalg.inv(_homogeneous(affine, ndim)), device=points.device)
    spatial = image.shape[1:] if channels else image.shape
    # fold voxel -> [-1, 1] (grid_sample, align_corners=True) into the matrix: one pass over the points
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in spatial], dtype=torch.float64, device=points.device)
    to_norm = torch.eye(ndim + 1, dtype=torch.float64, device=points.device)
    to_norm[:ndim, :ndim] = torch.diag(scale)
    to_norm[:ndim, ndim] = -1.0
    norm = apply_affine((to_norm @ world_to_voxel).to(dtype), points.to(dtype))
    out_shape = points.shape[1:]
    # any point layout -> (1, N, 1[, 1], ndim), the shape grid_sample takes for a 2D/3D image; (x, y, z) reversed
    grid = norm.reshape(ndim, -1).flip(0).T.reshape(1, -1, *[1] * (ndim - 1), ndim)
    values = image.to(dtype)[None] if channels else image.to(dtype)[None, None]
    out = F.grid_sample(values, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
    out = out.reshape(-1, *out_shape) if channels else out.reshape(out_shape)
    return out.round().to(image.dtype) if mode == "nearest" and not image.is_floating_point() else out
