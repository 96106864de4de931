"""The inverse of a displacement field by fixed-point iteration (for transforms that do not carry their own inverse).

For ``φ(x) = x + u(x)`` the inverse ``φ⁻¹(y) = y + w(y)`` satisfies ``φ(φ⁻¹(y)) = y``, i.e.

    w(y) = −u(y + w(y)),

which is iterated from ``w = −u``: ``w ← −u ∘ (id + w)``. The map ``w ↦ −u ∘ (id + w)`` is a contraction where
``u`` is smooth (its Lipschitz constant is ``max |∇u| < 1``, which holds for every diffeomorphic field of the
instance optimisation in practice), so the error falls geometrically; the iteration stops when the largest change
is below ``tolerance`` voxels or after ``iterations`` steps. Fields are in voxels of their own grid, shape
``(B, ndim, *S)``, channel ``i`` along tensor axis ``i`` (:mod:`deepsim.spatial`'s convention); outside the grid
``u`` is continued by its border values. Everything runs on the field's device.

Kept apart from :mod:`.instance` so that an optimiser that fits the inverse itself (a symmetric one) can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["InverseResult", "invert_displacement", "compose_displacements"]


@dataclass(frozen=True)
class InverseResult:
    """``ddf``: (B, ndim, *S) inverse displacement in voxels; ``residual``: the largest ``|φ(φ⁻¹(y)) − y|`` over the
    grid (voxels) after the last step, ``residual_p99`` its 99th percentile (a few voxels where the field is not
    contractive, e.g. at a border it was padded across, dominate the maximum); ``steps``: iterations taken."""

    ddf: torch.Tensor
    residual: float
    residual_p99: float
    steps: int


def _sampling_grid(ddf: torch.Tensor) -> torch.Tensor:
    """grid_sample's absolute grid (B, *S, ndim), x first, of the points ``index + ddf`` (align_corners=True)."""
    ndim = ddf.shape[1]
    shape = ddf.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, n, device=ddf.device, dtype=ddf.dtype) if n > 1 else
            torch.zeros(1, device=ddf.device, dtype=ddf.dtype) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=ddf.device, dtype=ddf.dtype)
    points = identity + ddf * scale.view(1, ndim, *[1] * ndim)
    return points.permute(0, *range(2, ndim + 2), 1).flip(-1)


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The displacement of ``(id + outer) ∘ (id + inner)``: ``inner(x) + outer(x + inner(x))``.

    outer, inner: (B, ndim, *S) voxels on one grid -> (B, ndim, *S); ``outer`` is read linearly, border-continued."""
    if outer.shape != inner.shape:
        raise ValueError(f"fields must have one shape, got {tuple(outer.shape)} and {tuple(inner.shape)}")
    sampled = F.grid_sample(outer, _sampling_grid(inner), mode="bilinear", padding_mode="border", align_corners=True)
    return inner + sampled


@torch.no_grad()
def invert_displacement(ddf: torch.Tensor, iterations: int = 50, tolerance: float = 1e-3) -> InverseResult:
    """Inverse of ``φ = id + ddf`` by the fixed-point iteration of the module docstring.

    ddf: (B, ndim, *S) voxels, ndim 2 or 3. ``tolerance``: stop when no voxel's inverse moved by more than this
    (voxels) in one step. The returned ``residual`` is measured, not assumed: ``max |ddf ∘ (id + w) + w|``."""
    if ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(f"ddf must be (B, ndim, *S) with ndim 2 or 3 channels, got {tuple(ddf.shape)}")
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"iterations must be >= 1 and tolerance > 0, got {iterations} and {tolerance}")
    u = ddf.float()
    w = -u
    steps = 0
    for steps in range(1, iterations + 1):
        step = -F.grid_sample(u, _sampling_grid(w), mode="bilinear", padding_mode="border", align_corners=True)
        change = float((step - w).abs().amax())
        w = step
        if change < tolerance:
            break
    error = compose_displacements(u, w).abs().amax(dim=1).flatten()
    sample = error[:: max(1, error.numel() // 1_000_000)]  # torch.quantile takes at most 16M values
    return InverseResult(w, float(error.max()), float(torch.quantile(sample, 0.99)), steps)
