"""The learned similarity as a reusable artefact: DeepSimLoss.from_bundle and the documented MONAI example."""

import re
from pathlib import Path

import pytest
import torch

from deepsim.engine.checkpoints import save_checkpoint
from deepsim.features.networks import build_feature_net
from deepsim.losses import DeepSimLoss

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["seg", "ae"])
def test_shipped_feature_nets_load_frozen_and_score_identical_images_zero(kind):
    loss = DeepSimLoss.from_bundle("brain_mri", kind=kind)
    assert not any(p.requires_grad for p in loss.feature_net.parameters())
    image = torch.rand(1, 1, 32, 40, 32)
    assert loss(image, image).item() == pytest.approx(0.0, abs=1e-5)
    warped = torch.rand(1, 1, 32, 40, 32, requires_grad=True)
    value = loss(warped, image)
    value.backward()
    assert value.item() > 0.01 and warped.grad.abs().sum() > 0


def test_from_bundle_takes_an_output_folder_or_checkpoint_and_names_a_missing_one(tmp_path):
    net = build_feature_net("ae", spatial_dims=2, in_channels=1, channels=[4, 8])
    path = save_checkpoint(tmp_path / "models" / "feature_ae.pt", net, "feature_net",
                           {"kind": "ae", "spatial_dims": 2, "in_channels": 1, "channels": [4, 8]})
    for source in (tmp_path, path):
        loss = DeepSimLoss.from_bundle(source, kind="ae")
        assert loss(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)).item() > 0
    with pytest.raises(FileNotFoundError, match="feature_seg.pt"):
        DeepSimLoss.from_bundle(tmp_path, kind="seg")


def test_documented_monai_example_runs_and_trains_only_the_registration_net():
    text = (REPO / "bundles" / "brain_mri" / "docs" / "README.md").read_text()
    block = re.search(r"<!-- example: learned-similarity.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    code = [line for line in block.splitlines() if line.strip() and not line.startswith(("from ", "import "))]
    assert len(code) <= 5  # the promised five-line example (imports aside)
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,))
    scope = {"torch": torch, "net": net, "moving": torch.rand(1, 1, 24, 32, 24), "fixed": torch.rand(1, 1, 24, 32, 24)}
    exec(block, scope)
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in scope["similarity"].feature_net.parameters())
