"""Jacobian determinant of φ = id + u, folding % and std log|J| on fields with analytic answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian

SHAPES = {2: (9, 8), 3: (7, 6, 5)}


def _coordinates(spatial):
    """(ndim, *spatial) voxel coordinates x, float64."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij"))


def _affine_field(matrix, offset, spatial):
    """u(x) = (A − I) x + b, shape (1, ndim, *spatial)."""
    x = _coordinates(spatial)
    a = torch.as_tensor(matrix, dtype=torch.float64) - torch.eye(len(spatial), dtype=torch.float64)
    b = torch.as_tensor(offset, dtype=torch.float64).reshape(-1, *[1] * len(spatial))
    return (torch.einsum("ij,j...->i...", a, x) + b)[None]


@pytest.mark.parametrize("ndim", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("seed", [0, 1])
def test_jacobian_of_affine_field_equals_matrix_determinant(ndim, seed):
    g = torch.Generator().manual_seed(seed)
    matrix = torch.eye(ndim, dtype=torch.float64) + 0.3 * torch.randn(ndim, ndim, generator=g, dtype=torch.float64)
    ddf = _affine_field(matrix, torch.randn(ndim, generator=g), SHAPES[ndim])
    det = jacobian_determinant(ddf)
    assert det.shape == (1, *SHAPES[ndim])
    # linear fields are differentiated exactly, border voxels included (one-sided differences)
    torch.testing.assert_close(det, torch.full_like(det, float(torch.linalg.det(matrix))))


@pytest.mark.parametrize("ndim", [2, 3], ids=["2d", "3d"])
def test_reflection_folds_every_voxel(ndim):
    matrix = torch.eye(ndim)
    matrix[0, 0] = -1.0
    det = jacobian_determinant(_affine_field(matrix, torch.zeros(ndim), SHAPES[ndim]))
    torch.testing.assert_close(det, torch.full_like(det, -1.0))
    assert folding_percent(det) == 100.0
    assert math.isnan(std_log_jacobian(det))  # no voxel with det > 0


@pytest.mark.parametrize("ndim", [2, 3], ids=["2d", "3d"])
def test_identity_field_has_unit_determinant_no_folding_and_zero_spread(ndim):
    ddf = torch.zeros(2, ndim, *SHAPES[ndim])
    det = jacobian_determinant(ddf)
    assert det.shape == (2, *SHAPES[ndim])
    assert torch.equal(det, torch.ones_like(det))
    assert folding_percent(det) == 0.0
    assert std_log_jacobian(det) == 0.0


@pytest.mark.parametrize("ndim", [2, 3], ids=["2d", "3d"])
def test_folding_percent_of_hand_made_folded_block(ndim):
    # u_0 = −3 (clamp(x_0, a, b) − a) inside a sub-block of the other axes: ∂φ_0/∂x_0 = 1 − 3 = −2 strictly
    # inside [a, b] and 1 − 3/2 = −0.5 on its two end slices (central differences); only u_0 varies, so
    # det J = ∂φ_0/∂x_0.
    # Folded voxels: (b − a + 1) slices along axis 0 × the sub-block's extent in the other axes.
    spatial = (12, 8, 6)[:ndim]
    a, b = 3, 6
    block = tuple(slice(2, 5) for _ in range(ndim - 1))  # 3 voxels along each other axis
    x0 = _coordinates(spatial)[0]
    ddf = torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    ddf[(0, 0, slice(None), *block)] = (-3.0 * (x0.clamp(a, b) - a))[(slice(None), *block)]
    det = jacobian_determinant(ddf)

    expected_folded = (b - a + 1) * 3 ** (ndim - 1)
    assert int((det <= 0).sum()) == expected_folded
    assert folding_percent(det) == pytest.approx(100.0 * expected_folded / math.prod(spatial))
    inside = det[(0, slice(a + 1, b), *block)]
    torch.testing.assert_close(inside, torch.full_like(inside, -2.0))
    # restricted to the block's columns, the folded share is (b − a + 1) / n_0
    mask = torch.zeros(spatial, dtype=torch.bool)
    mask[(slice(None), *block)] = True
    assert folding_percent(det, mask) == pytest.approx(100.0 * (b - a + 1) / spatial[0])


@pytest.mark.parametrize("ndim", [2, 3], ids=["2d", "3d"])
def test_std_log_jacobian_of_two_determinant_regions_equals_analytic_value(ndim):
    # u_0 piecewise linear along axis 0, slope s1 before x_0 = m and s2 after: det J = 1 + s1 on [0, m − 1],
    # 1 + s2 on [m + 1, n − 1]; the junction slice m gets the average slope and is masked out.
    spatial = (10, 5, 4)[:ndim]
    m, s1, s2 = 4, 0.5, -0.4
    x0 = _coordinates(spatial)[0]
    ddf = torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    ddf[0, 0] = torch.where(x0 <= m, s1 * x0, s1 * m + s2 * (x0 - m))
    det = jacobian_determinant(ddf)
    mask = torch.ones(1, 1, *spatial, dtype=torch.bool)  # (B, 1, *spatial) layout of a brain mask
    mask[:, :, m] = False

    n1, n2 = m, spatial[0] - m - 1
    expected = abs(math.log(1 + s1) - math.log(1 + s2)) * math.sqrt(n1 * n2) / (n1 + n2)
    assert std_log_jacobian(det, mask) == pytest.approx(expected, rel=1e-9)
    assert folding_percent(det, mask) == 0.0
    # without the mask the junction slice adds a third value: compare with numpy on the known values
    values = np.concatenate([np.full(n1, 1 + s1), [1 + (s1 + s2) / 2], np.full(n2, 1 + s2)])
    assert std_log_jacobian(det) == pytest.approx(np.log(values).std(), rel=1e-9)


def test_std_log_jacobian_ignores_folded_voxels():
    det = torch.tensor([[math.e, 1.0, -3.0, 0.0]])
    assert std_log_jacobian(det) == pytest.approx(0.5)  # std of {1, 0}
    assert folding_percent(det) == 50.0


def test_field_with_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="3 displacement channels for 2 spatial dimensions"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4))
