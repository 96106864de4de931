"""Similarity losses: DeepSim against a direct computation, its behaviour under misalignment, gradient flow."""

import pytest
import torch

from deepsim.features.networks import build_feature_net
from deepsim.registration.network import RegistrationNet
from deepsim.registration.objective import RegistrationObjective
from deepsim.losses import (DeepSimLoss, LocalNCCLoss, MSELoss, build_similarity,
                                             cosine_similarity_map, deepsim_similarity)
from deepsim.spatial import warp_image


def _smooth_volume(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[s // 4 for s in shape], generator=g)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def _feature_net(ndim=3, kind="ae"):
    torch.manual_seed(0)
    return build_feature_net(kind, ndim, 1, num_classes=3 if kind == "seg" else None, channels=(4, 8))


def test_cosine_similarity_map_matches_hand_computed_vectors():
    a = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    b = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1)
    assert cosine_similarity_map(a, b, eps=0).item() == pytest.approx(2 ** -0.5)
    assert cosine_similarity_map(a, -a, eps=0).item() == pytest.approx(-1.0)


def test_deepsim_similarity_is_mean_over_levels_of_mean_over_pixels():
    torch.manual_seed(1)
    fa = [torch.randn(2, 4, 6, 6, 6), torch.randn(2, 8, 3, 3, 3)]
    fb = [torch.randn(2, 4, 6, 6, 6), torch.randn(2, 8, 3, 3, 3)]
    expected = sum(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean() for a, b in zip(fa, fb)) / 2
    assert deepsim_similarity(fa, fb).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["ae", "seg"])
def test_deepsim_loss_is_zero_for_identical_inputs(kind):
    x = _smooth_volume((16, 16, 16))
    loss = DeepSimLoss(_feature_net(kind=kind))
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)


def test_deepsim_loss_falls_as_alignment_improves():
    fixed = _smooth_volume((24, 24, 24), seed=3)
    loss = DeepSimLoss(_feature_net())
    values = []
    for shift in (3.0, 2.0, 1.0, 0.0):
        ddf = torch.zeros(1, 3, 24, 24, 24)
        ddf[:, 0] = shift
        values.append(loss(warp_image(fixed, ddf), fixed).item())
    assert values == sorted(values, reverse=True) and values[-1] < values[0]


def test_deepsim_gradient_reaches_registration_net_but_not_frozen_feature_net():
    torch.manual_seed(0)
    feature_net = _feature_net(kind="seg")
    before = {k: v.clone() for k, v in feature_net.state_dict().items()}
    net = RegistrationNet(3, 1, channels=(4, 8, 8))
    objective = RegistrationObjective(DeepSimLoss(feature_net), regularization_weight=0.1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    fixed, moving = _smooth_volume((16, 16, 16), 1), _smooth_volume((16, 16, 16), 2)
    for _ in range(2):
        optimizer.zero_grad()
        ddf = net(moving, fixed)
        objective(warp_image(moving, ddf), fixed, ddf)["loss"].backward()
        assert net.flow[1].weight.grad is not None and net.flow[1].weight.grad.abs().sum() > 0
        optimizer.step()
    assert all(p.grad is None for p in feature_net.parameters())
    for k, v in feature_net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not feature_net.training


def test_mse_and_ncc_are_zero_for_identical_inputs_and_positive_otherwise():
    a, b = _smooth_volume((16, 16, 16), 0), _smooth_volume((16, 16, 16), 5)
    for loss in (MSELoss(), LocalNCCLoss(3, window=5)):
        assert loss(a, a).item() == pytest.approx(0.0, abs=1e-4)
        assert loss(a, b).item() > 1e-3


def test_build_similarity_rejects_unknown_names_and_missing_feature_net():
    with pytest.raises(ValueError, match="unknown similarity"):
        build_similarity("vgg")
    with pytest.raises(ValueError, match="feature net"):
        build_similarity("deepsim-seg")


def test_cosine_similarity_of_zero_feature_vectors_is_zero_with_finite_gradient():
    a = torch.zeros(1, 4, 3, requires_grad=True)
    b = torch.randn(1, 4, 3)
    sim = cosine_similarity_map(a, b)
    sim.sum().backward()
    assert torch.equal(sim, torch.zeros(1, 3)) and torch.isfinite(a.grad).all()
