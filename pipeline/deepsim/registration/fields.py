"""Displacement fields in grid_sample's normalised units: sampling, composition, integration, inversion.

The instance optimisation (:mod:`.instance`, :mod:`.symmetric`) keeps its fields in the units of
``torch.nn.functional.grid_sample`` with ``align_corners=True`` — [-1, 1] across each axis, components in our
tensor-axis order — so a field keeps its meaning when it is resized to another pyramid level. A field ``u``
(B, ndim, *S) stands for the map φ(x) = x + u(x), read as a pull-back: ``sample(image, u)`` is ``image ∘ φ``.
What enters and leaves the optimisation is a displacement in voxels (:func:`ddf_to_normalised`,
:func:`normalised_to_ddf`). Identity grids are built once per shape and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from deepsim.filters import downsample

__all__ = ["sample", "identity_normalised", "compose", "integrate_velocity", "invert_displacement", "solve_inverse",
           "ddf_to_normalised", "normalised_to_ddf", "resize_field"]

_GRIDS: dict[tuple, torch.Tensor] = {}


def _identity(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """grid_sample's identity grid (1, *S, ndim), coordinates in (x, y[, z]) = reversed tensor-axis order."""
    key = (tuple(shape), device, dtype)
    if key not in _GRIDS:
        if len(_GRIDS) > 16:
            _GRIDS.clear()
        ndim = len(shape)
        theta = torch.eye(ndim, ndim + 1, device=device, dtype=dtype)[None]
        _GRIDS[key] = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    return _GRIDS[key]


def _as_grid(u: torch.Tensor) -> torch.Tensor:
    """Normalised displacement (B, ndim, *S), tensor-axis order -> absolute sampling grid (B, *S, ndim), x first."""
    ndim = u.shape[1]
    return _identity(u.shape[2:], u.device, u.dtype) + u.permute(0, *range(2, ndim + 2), 1).flip(-1)


def identity_normalised(u: torch.Tensor) -> torch.Tensor:
    """The identity map's coordinates (1, ndim, *S) in normalised units and tensor-axis order, like ``u``'s."""
    ndim = u.shape[1]
    return _identity(u.shape[2:], u.device, u.dtype).flip(-1).permute(0, ndim + 1, *range(1, ndim + 1))


def sample(image: torch.Tensor, u: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``image`` (B, C, *S) read at x + u(x), u (B, ndim, *S) normalised -> (B, C, *S); linear interpolation."""
    return F.grid_sample(image, _as_grid(u), mode="bilinear", padding_mode=padding, align_corners=True)


def compose(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The displacement of (id + u) ∘ (id + v), i.e. x ↦ x + v(x) + u(x + v(x)); both (B, ndim, *S) normalised."""
    return v + sample(u, v)


def integrate_velocity(v: torch.Tensor, steps: int) -> torch.Tensor:
    """exp(v) by scaling and squaring: u ← v / 2^steps, then ``steps`` times u ← u + u ∘ (id + u).

    v: (B, ndim, *S) normalised velocity -> (B, ndim, *S) normalised displacement of the flow at time 1."""
    u = v / (2 ** steps)
    for _ in range(steps):
        u = u + sample(u, u)
    return u


def _jacobian(u: torch.Tensor) -> torch.Tensor:
    """∂u_i/∂x_j of a normalised field (B, ndim, *S) by central differences (one-sided at the borders), in
    normalised units per normalised unit: (B, ndim, ndim, *S)."""
    ndim = u.shape[1]
    columns = []
    for axis in range(ndim):
        n = u.shape[2 + axis]
        step = 2.0 / max(n - 1, 1)  # one voxel in normalised units along this axis
        columns.append(torch.gradient(u, spacing=step, dim=2 + axis)[0] if n > 1 else torch.zeros_like(u))
    return torch.stack(columns, dim=2)


def _solve_small(matrix: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A x = b at every voxel for 2x2 or 3x3 A by Cramer's rule: matrix (B, n², *S) holding A row by row,
    rhs (B, n, *S) -> (x (B, n, *S), det A (B, *S)). Elementwise on whole channels: a batched
    ``torch.linalg.solve`` over millions of tiny systems is many times slower on the CPU."""
    a = matrix.unbind(1)
    b = rhs.unbind(1)
    if rhs.shape[1] == 2:
        det = a[0] * a[3] - a[1] * a[2]
        return torch.stack([a[3] * b[0] - a[1] * b[1], a[0] * b[1] - a[2] * b[0]], dim=1) / det[:, None], det
    # the adjugate, row by row (cofactors of A transposed)
    c00, c01, c02 = a[4] * a[8] - a[5] * a[7], a[2] * a[7] - a[1] * a[8], a[1] * a[5] - a[2] * a[4]
    c10, c11, c12 = a[5] * a[6] - a[3] * a[8], a[0] * a[8] - a[2] * a[6], a[2] * a[3] - a[0] * a[5]
    c20, c21, c22 = a[3] * a[7] - a[4] * a[6], a[1] * a[6] - a[0] * a[7], a[0] * a[4] - a[1] * a[3]
    det = a[0] * c00 + a[1] * c10 + a[2] * c20
    x = torch.stack([c00 * b[0] + c01 * b[1] + c02 * b[2], c10 * b[0] + c11 * b[1] + c12 * b[2],
                     c20 * b[0] + c21 * b[1] + c22 * b[2]], dim=1)
    return x / det[:, None], det


def invert_displacement(u: torch.Tensor, iterations: int = 20, tolerance_voxels: float = 1e-3) -> torch.Tensor:
    """The displacement ``v`` of (id + u)⁻¹ on the same grid (:func:`solve_inverse`, without its step count).
    u: (B, ndim, *S) normalised -> (B, ndim, *S) normalised."""
    return solve_inverse(u, iterations, tolerance_voxels)[0]


def _jacobian_at(jacobian: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """I + ∇u (``jacobian``, (B, ndim², *S) row by row) read at y + v(y), as the border-continued u has it: beyond
    the grid along axis j, u no longer changes along j, so column j there is the identity's."""
    ndim = v.shape[1]
    at = sample(jacobian, v)
    outside = ((identity_normalised(v) + v).abs() > 1.0).unbind(1)
    if not any(bool(o.any()) for o in outside):
        return at
    rows = list(at.unbind(1))
    for j in range(ndim):
        for i in range(ndim):
            rows[i * ndim + j] = torch.where(outside[j], float(i == j), rows[i * ndim + j])
    return torch.stack(rows, dim=1)


@torch.no_grad()
def solve_inverse(u: torch.Tensor, iterations: int = 20, tolerance_voxels: float = 1e-3) -> tuple[torch.Tensor, int]:
    """The displacement ``v`` of (id + u)⁻¹ on the same grid: the v with v(y) + u(y + v(y)) = 0 at every grid
    point y, solved point by point by Newton's method from v = −u.

    Each step solves (I + ∇u(y + v)) δ = v + u(y + v) for δ (∇u by central differences) and sets v ← v − δ, so
    it converges wherever the map is invertible, also where it stretches a lot (the plain fixed-point iteration
    v ← −u ∘ (id + v) diverges where ∇u has an eigenvalue beyond ±1). Where I + ∇u is (nearly) singular — a map
    folded there, which has no inverse — the bounded fixed-point step is taken instead, no step is longer than
    one voxel, and points still more than half a voxel from a solution at the end, or sent farther than ``u``
    sends any point, get the estimate −u ∘ (id − u).
    Stops after ``iterations`` or once no step is longer than ``tolerance_voxels``. Points whose inverse image
    lies outside the grid read ``u`` at the border (and its derivative as that border continuation's).
    u: (B, ndim, *S) normalised -> ((B, ndim, *S) normalised, the number of steps taken)."""
    ndim = u.shape[1]
    to_voxels = torch.tensor([max(n - 1, 1) / 2.0 for n in u.shape[2:]], device=u.device, dtype=u.dtype)
    to_voxels = to_voxels.view(1, ndim, *[1] * ndim)
    jacobian = _jacobian(u).flatten(1, 2)  # (B, ndim², *S), row by row: sampled at y + v like u
    for i in range(ndim):
        jacobian[:, i * (ndim + 1)] += 1.0  # I + ∇u
    v, taken = -u, 0
    for taken in range(1, iterations + 1):
        residual = v + sample(u, v)
        step, det = _solve_small(_jacobian_at(jacobian, v), residual)
        step = torch.where((det > 0.05)[:, None] & step.isfinite(), step, residual)
        length = (step * to_voxels).square().sum(dim=1, keepdim=True).sqrt()
        v = v - step / length.clamp_min(1.0)
        if float(length.amax()) < tolerance_voxels:
            break
    # where it did not converge, or reached farther than u ever moves a point (a true inverse moves y by
    # |u(x)| for x = y + v(y)): a folded map, without an inverse there; the bounded estimate −u ∘ (id − u)
    longest = float((u * to_voxels).square().sum(dim=1).sqrt().amax())
    unsolved = ((((v + sample(u, v)) * to_voxels).square().sum(dim=1, keepdim=True) > 0.25)
                | ((v * to_voxels).square().sum(dim=1, keepdim=True).sqrt() > longest + 0.5))
    return (torch.where(unsolved, -sample(u, -u), v) if bool(unsolved.any()) else v), taken


def ddf_to_normalised(ddf: torch.Tensor) -> torch.Tensor:
    """Voxel displacement (B, ndim, *S) -> grid_sample's normalised units (align_corners=True)."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in ddf.shape[2:]], device=ddf.device, dtype=ddf.dtype)
    return ddf * scale.view(1, -1, *[1] * (ddf.ndim - 2))


def normalised_to_ddf(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ddf_to_normalised`."""
    scale = torch.tensor([max(n - 1, 1) / 2.0 for n in u.shape[2:]], device=u.device, dtype=u.dtype)
    return u * scale.view(1, -1, *[1] * (u.ndim - 2))


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A normalised field moved to another grid shape (linear; blurred first when shrinking)."""
    if tuple(u.shape[2:]) == tuple(shape):
        return u
    if all(m >= n for m, n in zip(shape, u.shape[2:])):
        mode = "trilinear" if u.ndim == 5 else "bilinear"
        return F.interpolate(u, size=tuple(shape), mode=mode, align_corners=True)
    return downsample(u, shape)
