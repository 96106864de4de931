"""The spatial convention: pull-back warping in voxels, label values kept, voxel -> world conversion."""

import numpy as np
import pytest
import torch

from deepsim.spatial import ddf_voxel_to_world, identity_grid, warp_image, warp_labels, warp_onehot


@pytest.mark.parametrize("ndim", [2, 3])
def test_known_integer_shift_reproduces_shifted_image(ndim):
    torch.manual_seed(0)
    shape = (12,) * ndim
    image = torch.rand(1, 1, *shape)
    shift = [2, -1, 3][:ndim]
    ddf = torch.zeros(1, ndim, *shape)
    for axis, s in enumerate(shift):
        ddf[:, axis] = s
    warped = warp_image(image, ddf)
    # pull-back: warped[x] = image[x + s]; compare on the interior where x + s stays inside the image
    inner = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape))
    source = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, shape))
    torch.testing.assert_close(warped[(0, 0, *inner)], image[(0, 0, *source)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_labels_keeps_large_label_values_exactly(ndim):
    shape = (10,) * ndim
    labels = torch.randint(0, 3, (1, 1, *shape)) * 1000 + 2035  # FreeSurfer-like values
    ddf = torch.randn(1, ndim, *shape) * 0.7
    warped = warp_labels(labels, ddf)
    assert warped.dtype == labels.dtype
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist()) | {0}


def test_warp_onehot_channels_still_sum_to_one_inside():
    labels = torch.randint(0, 4, (1, 16, 16, 16))
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    ddf = torch.full((1, 3, 16, 16, 16), 0.5)
    out = warp_onehot(onehot, ddf)
    torch.testing.assert_close(out[:, :, :-1, :-1, :-1].sum(1), torch.ones(1, 15, 15, 15))


def test_ddf_voxel_to_world_applies_spacing_and_axis_flips_but_not_translation():
    affine = torch.tensor(np.diag([-2.0, 3.0, 1.5, 1.0]))
    affine[:3, 3] = torch.tensor([10.0, -5.0, 7.0], dtype=torch.float64)
    ddf = torch.zeros(1, 3, 2, 2, 2)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 1.0, 2.0, -1.0
    mm = ddf_voxel_to_world(ddf, affine)
    assert mm[0, :, 0, 0, 0].tolist() == [-2.0, 6.0, -1.5]


def test_mismatched_field_and_image_raise():
    with pytest.raises(ValueError, match="spatial size"):
        warp_image(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 7))


def test_identity_grid_holds_voxel_indices():
    grid = identity_grid((3, 4))
    assert grid.shape == (2, 3, 4)
    assert grid[0, 2, 1] == 2 and grid[1, 2, 1] == 1
