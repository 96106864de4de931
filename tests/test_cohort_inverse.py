"""Inverting a displacement field (Newton): φ⁻¹ ∘ φ ≈ id and φ ∘ φ⁻¹ ≈ id on analytic fields."""

import math

import pytest
import torch

from deepsim.registration.inverse import compose_displacements, invert_displacement


def _smooth_field(shape, amplitude: float) -> torch.Tensor:
    """A smooth analytic displacement (voxels), (1, ndim, *shape): sines of the coordinates, max |∇u| well below 1."""
    ndim = len(shape)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    channels = []
    for i in range(ndim):
        phase = sum(axes[j] * (0.11 + 0.03 * ((i + j) % 3)) for j in range(ndim))
        channels.append(amplitude * torch.sin(phase + i))
    return torch.stack(channels)[None].float()


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    index = (slice(None), slice(None)) + tuple(slice(margin, n - margin) for n in x.shape[2:])
    return x[index]


@pytest.mark.parametrize("shape", [(40, 36), (24, 28, 22)])
def test_inverse_composed_with_the_field_is_the_identity(shape):
    u = _smooth_field(shape, amplitude=2.0)
    result = invert_displacement(u, iterations=100, tolerance=1e-5)
    forward_then_inverse = compose_displacements(result.ddf, u)   # φ⁻¹ ∘ φ
    inverse_then_forward = compose_displacements(u, result.ddf)   # φ ∘ φ⁻¹
    # away from the border, where points leave the grid and the field is only border-continued. φ ∘ φ⁻¹ is what the
    # iteration solves on the grid points (to the tolerance); φ⁻¹ ∘ φ reads w between grid points, so it carries
    # linear interpolation's error, (h² / 8) Σ_j |∂²w/∂x_j²|: 0.036 voxels measured in 2D, 0.082 in 3D (one more
    # curvature term) for fields of 2 voxels amplitude; a tenth of a voxel bounds both
    assert _interior(inverse_then_forward, 4).abs().max() < 1e-3
    assert _interior(forward_then_inverse, 4).abs().max() < 0.1
    assert result.residual < 1e-3
    assert result.steps < 100


def test_inverse_of_a_constant_shift_is_the_opposite_shift():
    u = torch.zeros(1, 3, 16, 16, 16)
    u[:, 0] = 1.5
    u[:, 2] = -0.75
    result = invert_displacement(u)
    assert torch.allclose(result.ddf, -u, atol=1e-5)


def test_inverse_of_a_linear_field_matches_the_matrix_inverse():
    """φ(x) = A x (about the centre): φ⁻¹(y) = A⁻¹ y, so w(y) = (A⁻¹ − I) y exactly (a linear field is
    interpolated without error inside the grid)."""
    shape = (33, 33)
    a = torch.tensor([[1.05, 0.04], [-0.03, 0.97]], dtype=torch.float64)
    centre = torch.tensor([16.0, 16.0], dtype=torch.float64).view(2, 1, 1)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    u = (torch.einsum("ij,j...->i...", a - torch.eye(2, dtype=torch.float64), x - centre))[None].float()
    expected = torch.einsum("ij,j...->i...", torch.linalg.inv(a) - torch.eye(2, dtype=torch.float64), x - centre)
    result = invert_displacement(u, iterations=200, tolerance=1e-6)
    assert _interior(result.ddf - expected[None].float(), 3).abs().max() < 1e-3


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="ndim"):
        invert_displacement(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="iterations"):
        invert_displacement(torch.zeros(1, 2, 8, 8), iterations=0)
    assert math.isfinite(invert_displacement(torch.zeros(1, 2, 8, 8)).residual)
