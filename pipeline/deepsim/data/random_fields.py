"""Smooth random fields and the geometry the label-driven pair generator (:mod:`deepsim.data.synth`) is built from.

Functional core, batched torch on the inputs' device, 2D or 3D. Coordinates here are **normalised**
(``align_corners=True``: voxel ``i`` of an axis of ``n`` voxels sits at ``2 i / (n - 1) - 1``) with channel ``i``
the coordinate along tensor spatial axis ``i`` — the same channel order as :mod:`deepsim.spatial`, but in units
that do not change when a field is resized, so a velocity drawn at 1/16 resolution is integrated at 1/2 and used
at full resolution without rescaling its values. :func:`voxels_to_normalised` converts voxel displacements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

__all__ = [
    "coarse_shape",
    "normalised_grid",
    "voxels_to_normalised",
    "positions_to_displacement",
    "resize",
    "sample",
    "integrate_velocity",
    "affine_matrices",
    "apply_affine_normalised",
    "blur_per_item",
]


def coarse_shape(shape: Sequence[int], factor: float, minimum: int = 2) -> tuple[int, ...]:
    """Shape of a grid ``factor`` times coarser than ``shape`` (ceil, at least ``minimum`` voxels per axis)."""
    return tuple(max(minimum, math.ceil(int(n) / factor)) for n in shape)


def normalised_grid(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Identity positions (1, ndim, *shape) in normalised coordinates (channel i along spatial axis i), float32."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device) if n > 1 else torch.zeros(1, device=device)
            for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def _half_extent(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n - 1) / 2 per axis as a (1, ndim, 1, ...) tensor: normalised units → voxels about the centre."""
    h = torch.tensor([max(int(n) - 1, 1) / 2.0 for n in shape], device=device, dtype=dtype)
    return h.view(1, len(shape), *[1] * len(shape))


def voxels_to_normalised(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Displacements (B, ndim, ...) in voxels of a grid of ``shape`` → normalised units (divide by (n - 1) / 2)."""
    return field / _half_extent(shape, field.device, field.dtype)


def positions_to_displacement(positions: torch.Tensor) -> torch.Tensor:
    """Normalised positions (B, ndim, *S) → displacement in voxels (B, ndim, *S), :mod:`deepsim.spatial`'s field:
    ``warped[x] = image[x + u(x)]``."""
    shape = positions.shape[2:]
    return (positions - normalised_grid(shape, positions.device)) * _half_extent(shape, positions.device,
                                                                                 positions.dtype)


def resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear resize of (B, C, *S) to ``shape`` with ``align_corners=True`` (corner voxels kept)."""
    shape = tuple(int(n) for n in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=shape, mode=mode, align_corners=True)


def sample(x: torch.Tensor, positions: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
           ) -> torch.Tensor:
    """``x`` (B, C, *S_in) read at ``positions`` (B, ndim, *S_out) in normalised coordinates → (B, C, *S_out).

    ``grid_sample`` with ``align_corners=True``; its grid wants the last spatial axis first, hence the flip."""
    grid = positions.movedim(1, -1).flip(-1)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def integrate_velocity(velocity: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Displacement exp(v) of a stationary velocity field by scaling and squaring (Arsigny et al. 2006).

    velocity: (B, ndim, *S) in normalised units → displacement (B, ndim, *S), normalised. ``u = v / 2**steps``,
    then ``steps`` times ``u ← u + u ∘ (id + u)`` (linear interpolation, border values repeated outside).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    u = velocity / 2**steps
    identity = normalised_grid(velocity.shape[2:], velocity.device).to(velocity.dtype)
    for _ in range(steps):
        u = u + sample(u, identity + u, padding_mode="border")
    return u


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, ndim, ndim) from angles in radians: (B, 1) in 2D, (B, 3) in 3D (about axes 0, 1, 2)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if angles.shape[1] == 1:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], -1), torch.stack([s[:, 0], c[:, 0]], -1)], -2)
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c[:, 0], -s[:, 0]], -1),
                      torch.stack([zero, s[:, 0], c[:, 0]], -1)], -2)  # fmt: skip
    ry = torch.stack([torch.stack([c[:, 1], zero, s[:, 1]], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-s[:, 1], zero, c[:, 1]], -1)], -2)  # fmt: skip
    rz = torch.stack([torch.stack([c[:, 2], -s[:, 2], zero], -1), torch.stack([s[:, 2], c[:, 2], zero], -1),
                      torch.stack([zero, zero, one], -1)], -2)  # fmt: skip
    return rz @ ry @ rx


def affine_matrices(angles: torch.Tensor, log_scales: torch.Tensor, shears: torch.Tensor, shifts: torch.Tensor
                    ) -> torch.Tensor:
    """(B, ndim, ndim + 1) matrices ``[R · diag(exp(log_scales)) · Sh | shifts]`` in voxels about the grid centre.

    angles: (B, 1) in 2D or (B, 3) in 3D, radians; log_scales, shifts: (B, ndim), shifts in voxels; shears:
    (B, ndim (ndim - 1) / 2), the upper off-diagonal terms of the unit upper-triangular ``Sh``."""
    batch, ndim = shifts.shape
    shear = torch.eye(ndim, device=shifts.device, dtype=shifts.dtype).repeat(batch, 1, 1)
    rows, cols = torch.triu_indices(ndim, ndim, offset=1, device=shifts.device)
    shear[:, rows, cols] = shears
    linear = _rotation(angles) @ torch.diag_embed(torch.exp(log_scales)) @ shear
    return torch.cat([linear, shifts[..., None]], dim=-1)


def apply_affine_normalised(matrices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Map normalised ``positions`` (B, ndim, *S) through voxel-space ``matrices`` (B, ndim, ndim + 1) about the
    centre of the grid of shape ``*S``: centred voxels ``c = p (n - 1) / 2``, ``q = A c + t``, back to normalised.

    On an isotropic grid a rotation in centred voxels is a rotation in millimetres; in normalised units it is not
    (the axes have different lengths), which is why the matrices live in voxels."""
    ndim = positions.shape[1]
    h = _half_extent(positions.shape[2:], positions.device, positions.dtype)
    centred = (positions * h).flatten(2)  # (B, ndim, N)
    mapped = matrices[:, :, :ndim].to(positions.dtype) @ centred + matrices[:, :, ndim:].to(positions.dtype)
    return mapped.view_as(positions) / h


def blur_per_item(x: torch.Tensor, sigmas: torch.Tensor, truncate: float = 3.0, max_sigma: float | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *S) with its own σ per item and axis, ``sigmas`` (B, ndim) in voxels.

    One grouped convolution per axis (kernels padded to the largest radius; borders replicated); σ below 0.05
    voxel is the identity. ``max_sigma`` fixes the kernel length (so the work does not depend on the draw)."""
    batch, channels, ndim = x.shape[0], x.shape[1], x.ndim - 2
    top = float(sigmas.max()) if max_sigma is None else float(max_sigma)
    if top < 0.05:
        return x
    radius = max(1, math.ceil(truncate * top))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    conv = F.conv3d if ndim == 3 else F.conv2d
    out = x.reshape(1, batch * channels, *x.shape[2:])
    for axis in range(ndim):
        s = sigmas[:, axis].to(x.dtype).clamp_min(0.05)[:, None]  # (B, 1)
        kernel = torch.exp(-0.5 * (t[None] / s) ** 2)
        kernel = torch.where(sigmas[:, axis, None] < 0.05, (t[None] == 0).to(x.dtype), kernel)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
        shape = [batch * channels, 1] + [1] * ndim
        shape[2 + axis] = kernel.shape[1]
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape), groups=batch * channels)
    return out.view_as(x)
