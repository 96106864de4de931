"""The inverse of a displacement field in voxels, with its measured accuracy (for transforms that carry no inverse).

For ``φ(x) = x + u(x)`` the inverse ``φ⁻¹(y) = y + w(y)`` satisfies ``φ(φ⁻¹(y)) = y``, i.e.

    w(y) + u(y + w(y)) = 0   at every grid point y,

solved point by point by Newton's method (:func:`deepsim.registration.fields.solve_inverse`, the solver the
instance optimisation's own inverses use; it also converges where the field stretches or squeezes twofold, where
the plain fixed-point iteration ``w ← −u ∘ (id + w)`` does not). This module is its face in voxel units, the
units of :class:`~deepsim.registration.pipeline.Registration`: fields of shape ``(B, ndim, *S)``, channel ``i``
along tensor axis ``i`` (:mod:`deepsim.spatial`'s convention), ``u`` continued by its border values outside the
grid, everything on the field's device. :func:`inverse_residuals` measures how well any inverse (computed here or
fitted by the symmetric optimiser) solves the equation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepsim.registration.fields import compose, ddf_to_normalised, normalised_to_ddf, solve_inverse

__all__ = ["InverseResult", "invert_displacement", "compose_displacements", "inverse_residuals"]


@dataclass(frozen=True)
class InverseResult:
    """``ddf``: (B, ndim, *S) inverse displacement in voxels; ``residual``: the largest ``|φ(φ⁻¹(y)) − y|`` over the
    grid (voxels, largest component) after the last step, ``residual_p99`` its 99th percentile (a few voxels where
    the field is not invertible, e.g. at a border it was padded across, dominate the maximum); ``steps``: Newton
    steps taken."""

    ddf: torch.Tensor
    residual: float
    residual_p99: float
    steps: int


def _check(ddf: torch.Tensor, name: str = "ddf") -> None:
    if ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(f"{name} must be (B, ndim, *S) with ndim 2 or 3 channels, got {tuple(ddf.shape)}")


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The displacement of ``(id + outer) ∘ (id + inner)``: ``inner(x) + outer(x + inner(x))``.

    outer, inner: (B, ndim, *S) voxels on one grid -> (B, ndim, *S); ``outer`` is read linearly, border-continued."""
    if outer.shape != inner.shape:
        raise ValueError(f"fields must have one shape, got {tuple(outer.shape)} and {tuple(inner.shape)}")
    return normalised_to_ddf(compose(ddf_to_normalised(outer), ddf_to_normalised(inner)))


@torch.no_grad()
def inverse_residuals(ddf: torch.Tensor, inverse: torch.Tensor) -> tuple[float, float]:
    """(max, 99th percentile) over the grid of ``|ddf ∘ (id + inverse) + inverse|``, the largest component, in
    voxels: how far ``φ ∘ φ⁻¹`` is from the identity at each grid point. ddf, inverse: (B, ndim, *S) voxels."""
    _check(ddf)
    error = compose_displacements(ddf.float(), inverse.float()).abs().amax(dim=1).flatten()
    sample = error[:: max(1, error.numel() // 1_000_000)]  # torch.quantile takes at most 16M values
    return float(error.max()), float(torch.quantile(sample, 0.99))


@torch.no_grad()
def invert_displacement(ddf: torch.Tensor, iterations: int = 50, tolerance: float = 1e-3) -> InverseResult:
    """Inverse of ``φ = id + ddf`` (module docstring), with its residuals measured, not assumed.

    ddf: (B, ndim, *S) voxels, ndim 2 or 3. Stops after ``iterations`` Newton steps or when no voxel's inverse
    moved by more than ``tolerance`` voxels in one step."""
    _check(ddf)
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"iterations must be >= 1 and tolerance > 0, got {iterations} and {tolerance}")
    u = ddf.float()
    w, steps = solve_inverse(ddf_to_normalised(u), iterations, tolerance)
    w = normalised_to_ddf(w)
    residual, p99 = inverse_residuals(u, w)
    return InverseResult(w, residual, p99, steps)
