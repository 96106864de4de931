"""Jacobian determinant of a displacement field, folding and smoothness statistics (DESIGN §4).

The transformation is ``φ(x) = x + u(x)`` with ``u`` a displacement field in voxels, shape ``(B, ndim, *spatial)``,
channel ``i`` the displacement along tensor spatial axis ``i`` (MONAI ``Warp`` convention). Its Jacobian is

    J_ij(x) = δ_ij + ∂u_i/∂x_j(x)

with the derivatives taken by central differences in the interior and one-sided differences at the border
(``torch.gradient``, unit spacing). Linear fields are therefore differentiated exactly everywhere.

Voxel units and physical spacing: ``φ`` maps voxel coordinates of the fixed grid to voxel coordinates of the
moving grid, and both grids share the same spacing ``S = diag(s)`` (the moving image is resampled on the fixed
grid). The physical map is ``S φ S⁻¹``, whose Jacobian ``S J S⁻¹`` has the same determinant as ``J``. So the
voxel-unit determinant below equals the physical (mm) one even for anisotropic spacing; no spacing argument
is needed.

Statistics:

- :func:`folding_percent` — 100 × fraction of voxels with ``det J ≤ 0`` (where ``φ`` folds or collapses).
- :func:`std_log_jacobian` — standard deviation (population, ddof 0) of ``log det J`` over the voxels with
  ``det J > 0``. This is NOT Learn2Reg's "SDlogJ", which clips ``J + 3`` into a positive range before the log and
  so counts folded voxels too; the two numbers are not comparable.

Both accept an optional ``mask`` (e.g. the fixed brain mask) restricting the voxels they pool.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["jacobian_determinant", "folding_percent", "std_log_jacobian"]


def jacobian_determinant(ddf: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Determinant of the Jacobian of ``φ = id + ddf``.

    Args:
        ddf: displacement field in voxels, ``(B, ndim, *spatial)`` with ``ndim`` 2 or 3 equal to the number of
            spatial dimensions; every spatial size at least 2.

    Returns:
        ``det J`` of shape ``(B, *spatial)``, same floating dtype as ``ddf`` (float32 for integer input).
    """
    u = torch.as_tensor(ddf)
    if u.ndim not in (4, 5):
        raise ValueError(f"ddf has shape {tuple(u.shape)}; expected (B, ndim, *spatial) with 2 or 3 spatial dims")
    ndim = u.ndim - 2
    if u.shape[1] != ndim:
        raise ValueError(
            f"ddf has shape {tuple(u.shape)}: {u.shape[1]} displacement channels for {ndim} spatial dimensions; "
            "expected one channel per spatial axis"
        )
    if min(u.shape[2:]) < 2:
        raise ValueError(f"ddf has spatial shape {tuple(u.shape[2:])}; every axis needs at least 2 voxels")
    if not u.is_floating_point():
        u = u.float()

    spatial_dims = tuple(range(2, 2 + ndim))
    # grads[j][:, i] = ∂u_i/∂x_j, shape (B, ndim, *spatial)
    grads = torch.gradient(u, dim=spatial_dims, edge_order=1)
    jac = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]

    if ndim == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def _select(det: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """Flattened determinants inside ``mask`` (all voxels, all batch items when ``mask`` is None)."""
    d = torch.as_tensor(det)
    if not d.is_floating_point():
        d = d.double()
    if mask is None:
        return d.reshape(-1)
    m = torch.as_tensor(mask, device=d.device)
    if m.shape != d.shape:
        if m.ndim == d.ndim + 1 and m.shape[1] == 1:  # (B, 1, *spatial) label/mask layout
            m = m[:, 0]
        if m.shape != d.shape:
            try:
                m = torch.broadcast_to(m, d.shape)
            except RuntimeError:
                raise ValueError(
                    f"mask has shape {tuple(torch.as_tensor(mask).shape)}, which does not match det of shape "
                    f"{tuple(d.shape)}; expected (B, *spatial), (B, 1, *spatial) or (*spatial)"
                ) from None
    return d[m != 0]


def folding_percent(det: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None) -> float:
    """Percentage (0–100) of voxels with ``det J ≤ 0``, pooled over batch and space (inside ``mask`` if given).

    Returns NaN when the mask selects no voxel.
    """
    d = _select(det, mask)
    if d.numel() == 0:
        return float("nan")
    return float(100.0 * (d <= 0).double().mean())


def std_log_jacobian(det: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None) -> float:
    """Population standard deviation of ``log det J`` over voxels with ``det J > 0`` (inside ``mask`` if given).

    Folded voxels are left out (report them with :func:`folding_percent`); not Learn2Reg's clipped SDlogJ.
    Returns NaN when no voxel has a positive determinant.
    """
    d = _select(det, mask).double()
    d = d[d > 0]
    if d.numel() == 0:
        return float("nan")
    return float(torch.log(d).std(correction=0))
