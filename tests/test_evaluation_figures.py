"""Every report figure writes a non-empty PNG for 2D and 3D inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from deepsim.evaluation.figures import (
    plot_deformation_grid,
    plot_dice_boxplot,
    plot_jacobian,
    plot_registration_overlay,
)
from deepsim.evaluation.jacobian import jacobian_determinant

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPATIAL = {2: (12, 10), 3: (10, 12, 8)}


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def pair(request):
    g = torch.Generator().manual_seed(0)
    spatial = SPATIAL[request.param]
    fixed = torch.rand(1, 1, *spatial, generator=g)
    moving = torch.rand(1, 1, *spatial, generator=g)
    ddf = 1.5 * torch.randn(1, len(spatial), *spatial, generator=g)  # rough enough to fold somewhere
    return fixed, moving, ddf


@pytest.mark.parametrize("slice_axis", [None, 1])
def test_registration_overlay_writes_png(pair, tmp_path, slice_axis):
    fixed, moving, _ = pair
    # torch (1, 1, *spatial), numpy (1, *spatial) and torch (*spatial) inputs together
    out = plot_registration_overlay(fixed, moving.numpy()[0], moving[0, 0], tmp_path / "o.png", slice_axis=slice_axis)
    _assert_png(out)


def test_deformation_grid_writes_png_with_and_without_background(pair, tmp_path):
    fixed, _, ddf = pair
    _assert_png(plot_deformation_grid(ddf, tmp_path / "grid.png"))
    _assert_png(plot_deformation_grid(ddf[0].numpy(), tmp_path / "sub" / "grid_bg.png", image=fixed))


def test_jacobian_map_writes_png_with_folded_voxels(pair, tmp_path):
    _, _, ddf = pair
    det = jacobian_determinant(ddf)
    assert (det <= 0).any()
    _assert_png(plot_jacobian(det, tmp_path / "jac.png"))
    _assert_png(plot_jacobian(torch.ones_like(det)[0], tmp_path / "jac_identity.png"))  # no folding, constant map


def test_dice_boxplot_writes_png(tmp_path):
    results = pd.DataFrame(
        {"method": ["mse", "mse", "identity", "identity"], "pair_id": [0, 1, 0, 1], "dice_mean": [0.5, 0.6, 0.3, 0.35]}
    )
    _assert_png(plot_dice_boxplot(results, tmp_path / "box.png"))
