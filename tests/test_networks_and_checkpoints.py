"""Networks start at the identity, expose their feature levels, and round-trip through safe checkpoints."""

import pytest
import torch

from deepsim.engine.checkpoints import build_network, load_network, save_checkpoint
from deepsim.errors import CheckpointError
from deepsim.features.networks import build_feature_net
from deepsim.registration.network import RegistrationNet


@pytest.mark.parametrize("ndim", [2, 3])
def test_untrained_registration_net_predicts_near_identity(ndim):
    net = RegistrationNet(ndim, 1, channels=(4, 8, 8))
    x = torch.rand(1, 1, *(16,) * ndim)
    ddf = net(x, x.flip(2))
    assert ddf.shape == (1, ndim, *(16,) * ndim)
    assert ddf.abs().max() < 1e-2


@pytest.mark.parametrize("ndim", [2, 3])
def test_half_res_mode_returns_a_full_resolution_field_in_full_resolution_voxels(ndim):
    torch.manual_seed(0)
    net = RegistrationNet(ndim, 1, channels=(4, 8, 8), half_res=True)
    torch.nn.init.zeros_(net.flow[1].weight)
    with torch.no_grad():
        net.flow[1].bias.copy_(torch.arange(1.0, ndim + 1))  # constant field (1, 2, 3) voxels at half resolution
    x = torch.rand(1, 1, *(16,) * ndim)
    ddf = net(x, x)
    assert ddf.shape == (1, ndim, *(16,) * ndim)
    for axis in range(ndim):  # a constant field is upsampled without any rescaling
        torch.testing.assert_close(ddf[0, axis], torch.full((16,) * ndim, axis + 1.0))


def test_diffeomorphic_mode_integrates_the_velocity_field():
    net = RegistrationNet(3, 1, channels=(4, 8, 8), diffeomorphic=True)
    x = torch.rand(1, 1, 16, 16, 16)
    assert net(x, x).shape == (1, 3, 16, 16, 16)


def test_registration_net_rejects_sizes_it_cannot_downsample():
    net = RegistrationNet(3, 1, channels=(4, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 18, 16, 16), torch.rand(1, 1, 18, 16, 16))


@pytest.mark.parametrize("kind", ["ae", "seg"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_feature_nets_expose_one_level_per_stage_at_halving_resolution(kind, ndim):
    net = build_feature_net(kind, ndim, 1, num_classes=5 if kind == "seg" else None, channels=(4, 8, 16))
    x = torch.rand(2, 1, *(16,) * ndim)
    feats = net.features(x)
    assert [f.shape[1] for f in feats] == [4, 8, 16]
    assert [f.shape[2] for f in feats] == [8, 4, 2]
    out = net(x)
    assert out.shape == ((2, 5, *(8,) * ndim) if kind == "seg" else x.shape)  # seg logits at 1/2 resolution
    if kind == "seg":
        assert net.segment(x).shape == (2, 1, *(16,) * ndim)


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    kwargs = {"spatial_dims": 3, "in_channels": 1, "channels": [4, 8, 8]}
    net = build_network("registration_net", kwargs)
    torch.nn.init.normal_(net.flow[1].weight)
    path = save_checkpoint(tmp_path / "reg.pt", net, "registration_net", kwargs, {"similarity": "mse"})
    loaded = load_network(path)
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(x, x), net(x, x))


def test_corrupted_or_foreign_checkpoints_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_network(bad)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "channels": [4, 8, 8]}
    path = save_checkpoint(tmp_path / "reg.pt", build_network("registration_net", kwargs), "registration_net", kwargs)
    payload = torch.load(path, weights_only=True)
    payload["kwargs"]["channels"] = [8, 8, 8]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load_network(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_network(tmp_path / "missing.pt")
