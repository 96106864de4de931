"""The speed-ups of the performance work keep the numbers: fast local NCC equals MONAI's, bf16 autocast leaves the
parts that need float32 in float32, the DeepSim fixed-image features are reused only while valid, and the
inference geometry (float32 points, nearest-neighbour gather, ISA-L gzip) agrees with the slower paths."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import LocalNormalizedCrossCorrelationLoss

from deepsim.engine.tasks import RegistrationTask
from deepsim.engine.trainer import autocast, build_trainer, speed_up
from deepsim.io import read_image, save_volume
from deepsim.geometry import sample_at
from deepsim.registration.network import RegistrationNet
from deepsim.registration.objective import RegistrationObjective
from deepsim.losses import DeepSimLoss, LocalNCCLoss, MSELoss, box_mean
from deepsim.features.networks import build_feature_net


@pytest.mark.parametrize("shape, window", [((2, 1, 20, 17, 23), 9), ((1, 2, 12, 12, 12), 3), ((2, 1, 40, 33), 9),
                                           ((1, 1, 8, 9, 10), 9), ((1, 1, 5, 30), 9)])
def test_local_ncc_equals_monai_value_and_gradient(shape, window):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    dims = len(shape) - 2
    a_ref = a.clone().requires_grad_(True)
    ref = 1 + LocalNormalizedCrossCorrelationLoss(spatial_dims=dims, kernel_size=window)(a_ref, b)
    (grad_ref,) = torch.autograd.grad(ref, a_ref)
    a_ours = a.float().requires_grad_(True)
    ours = LocalNCCLoss(dims, window)(a_ours, b.float())
    (grad_ours,) = torch.autograd.grad(ours, a_ours)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) < 1e-5
    assert float((grad_ours.double() - grad_ref).abs().max() / grad_ref.abs().max()) < 1e-4


def test_box_mean_is_the_zero_padded_box_average():
    x = torch.zeros(1, 1, 7, 7, 7)
    x[0, 0, 3, 3, 3] = 27.0
    m = box_mean(x, 3)
    assert torch.allclose(m[0, 0, 2:5, 2:5, 2:5], torch.ones(3, 3, 3))
    assert float(m.sum()) == pytest.approx(27.0)
    ones = box_mean(torch.ones(1, 1, 5, 5), 3)[0, 0]
    assert float(ones[0, 0]) == pytest.approx(4 / 9) and float(ones[2, 2]) == pytest.approx(1.0)


def test_local_ncc_under_bf16_autocast_stays_float32():
    a, b = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = LocalNCCLoss(3, 9)(a, b)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(LocalNCCLoss(3, 9)(a, b)), abs=1e-6)


def test_flow_head_runs_in_float32_under_bf16_autocast():
    net = RegistrationNet(3, channels=(4, 8, 8))
    with torch.no_grad():
        net.flow[1].weight.normal_(std=0.1)
    m, f = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddf = net(m, f)
    assert ddf.dtype == torch.float32
    # the backbone ran in bf16, so the field differs a little from fp32, but not by bf16's quantisation of the field
    assert float((ddf - net(m, f)).abs().max()) < 0.05 * float(ddf.abs().max())


def test_autocast_is_off_on_cpu_and_checks_its_argument():
    with autocast("cpu", "bf16"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "fp8")


class _CountingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = build_feature_net("ae", 3, channels=(4, 8))
        self.calls = 0

    def features(self, x):
        self.calls += 1
        return self.net.features(x)


def test_deepsim_reuses_fixed_features_only_for_the_same_unchanged_tensor():
    counting = _CountingNet()
    loss = DeepSimLoss(counting)
    fixed, warped = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    first = loss(warped, fixed)
    assert counting.calls == 2  # fixed + warped
    assert torch.equal(loss(warped, fixed), first) and counting.calls == 3  # fixed features reused
    fixed.mul_(0.5)  # in place: the cache must notice
    changed = loss(warped, fixed)
    assert counting.calls == 5 and not torch.equal(changed, first)
    fresh = DeepSimLoss(counting)(warped, fixed.clone())
    assert torch.allclose(changed, fresh)


def test_registration_task_unwraps_metatensors():
    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, m, f):
            seen["types"] = (type(m), type(f))
            return torch.zeros(m.shape[0], 3, *m.shape[2:]) + self.w

    batch = {"fixed": MetaTensor(torch.rand(1, 1, 8, 8, 8)), "moving": MetaTensor(torch.rand(1, 1, 8, 8, 8))}
    out = RegistrationTask(RegistrationObjective(MSELoss(), 0.1))(Net(), batch, "cpu")
    assert seen["types"] == (torch.Tensor, torch.Tensor)
    assert type(out["loss"]) is torch.Tensor


def test_speed_up_keeps_state_dict_keys_and_values():
    net = RegistrationNet(3, channels=(4, 8, 8))
    keys = list(net.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = speed_up(net, channels_last=True)
    assert list(fast.state_dict()) == keys
    assert all(torch.equal(before[k], v) for k, v in fast.state_dict().items())
    conv = next(p for p in fast.parameters() if p.ndim == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.allclose(fast(x, x), _reference(before)(x, x), atol=1e-5)


def _reference(state):
    net = RegistrationNet(3, channels=(4, 8, 8))
    net.load_state_dict(state)
    return net


def test_build_trainer_accepts_precision_and_refuses_unknown():
    net = RegistrationNet(3, channels=(4, 8, 8))
    task = RegistrationTask(RegistrationObjective(MSELoss(), 0.1))
    data = [{"fixed": torch.rand(1, 1, 16, 16, 16), "moving": torch.rand(1, 1, 16, 16, 16)}] * 2
    trainer = build_trainer(net, task, data, max_epochs=1, precision="bf16")
    trainer.run()  # on the CPU bf16 is a no-op: fp32 training
    assert trainer.state.iteration == 2
    with pytest.raises(ValueError, match="precision"):
        build_trainer(net, task, data, max_epochs=1, precision="half")


def test_nearest_sampling_gathers_label_values_exactly_and_zero_outside():
    gen = np.random.default_rng(0)
    labels = torch.as_tensor(gen.integers(0, 70000, size=(6, 7, 5)), dtype=torch.int64)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-3.0, 2.0, 1.0]
    # points: every voxel centre shifted by < half a voxel, plus two points outside
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij")).reshape(3, -1).astype(float)
    jitter = gen.uniform(-0.45, 0.45, idx.shape)
    world = affine[:3, :3] @ (idx + jitter) + affine[:3, 3:4]
    world = np.concatenate([world, affine[:3, :3] @ np.array([[-2.0, 3, 2], [1, 1, 9]]).T + affine[:3, 3:4]], 1)
    out = sample_at(labels, affine, torch.as_tensor(world), mode="nearest")
    assert out.dtype == torch.int64
    assert torch.equal(out[:-2], labels.reshape(-1))
    assert out[-2:].tolist() == [0, 0]
    for dtype in (torch.float64, torch.float32):
        points = torch.as_tensor(world).to(dtype)
        assert torch.equal(sample_at(labels, affine, points, mode="nearest")[:-2], labels.reshape(-1))


def test_gzip_writing_round_trips_through_nibabel(tmp_path):
    array = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    path = save_volume(tmp_path / "x.nii.gz", array, affine)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip magic
    img = nib.load(str(path))  # nibabel's own (zlib) reader
    assert np.array_equal(np.asarray(img.dataobj), array) and np.allclose(img.affine, affine)
    back, back_affine, _ = read_image(path)  # our ISA-L reader
    assert np.array_equal(back, array) and np.allclose(back_affine, affine)
    nib.save(nib.Nifti2Image(array, affine), str(tmp_path / "n2.nii.gz"))  # NIfTI-2 written by nibabel
    assert np.array_equal(read_image(tmp_path / "n2.nii.gz")[0], array)


@pytest.mark.parametrize("mode, padding", [("bilinear", "border"), ("nearest", "zeros"), ("bilinear", "zeros")])
@pytest.mark.parametrize("shape", [(2, 1, 9, 10, 11), (2, 3, 12, 13)])
def test_cached_grid_warp_equals_monai_warp(mode, padding, shape):
    from monai.networks.blocks import Warp

    from deepsim.spatial import CachedGridWarp

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=gen)
    ddf = 3 * torch.randn(shape[0], len(shape) - 2, *shape[2:], generator=gen)
    ours, theirs = CachedGridWarp(mode=mode, padding_mode=padding), Warp(mode=mode, padding_mode=padding)
    for _ in range(2):  # the second call uses the cached grid
        assert torch.equal(ours(image, ddf), theirs(image, ddf))
    assert torch.equal(ours(image[:1], ddf[:1]), theirs(image[:1], ddf[:1]))  # another batch size, same grid


def test_cached_grid_warp_builds_its_grid_once_per_shape_and_dtype():
    from deepsim.spatial import CachedGridWarp

    warp = CachedGridWarp()
    ddf = torch.zeros(1, 3, 6, 7, 8)
    grid = warp.get_reference_grid(ddf)
    assert grid.shape == (1, 3, 6, 7, 8) and float(grid[0, 2, 0, 0, 5]) == 5.0
    assert warp.get_reference_grid(torch.ones(4, 3, 6, 7, 8)) is grid
    assert warp.get_reference_grid(torch.zeros(1, 3, 6, 7, 9)) is not grid
    assert warp.get_reference_grid(ddf.double()).dtype == torch.float64


def test_diffeomorphic_net_integrates_like_monai_dvf2ddf():
    from monai.networks.blocks import DVF2DDF

    net = RegistrationNet(3, channels=(4, 8, 8), diffeomorphic=True)
    velocity = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(net.integrate(velocity), DVF2DDF(num_steps=7)(velocity), atol=1e-6)


def test_normalise_intensity_equals_monai_percentile_scaling(tmp_path):
    from monai.transforms import ScaleIntensityRangePercentiles

    from deepsim.registration.inference import load_native, normalise_intensity

    array = np.random.default_rng(3).gamma(2.0, 50.0, size=(20, 21, 22)).astype(np.float32)
    path = save_volume(tmp_path / "x.nii.gz", array, np.eye(4))
    ours = normalise_intensity(load_native(path, "image"))
    theirs = np.asarray(ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(array[None]))[0]
    assert ours.dtype == np.float32 and np.abs(ours - theirs).max() < 1e-5  # float32 rounding


@pytest.mark.parametrize("box", ["none", "own", "other"])
def test_resample_onto_fast_path_equals_sampling_at_grid_points(box):
    from deepsim.geometry import (Grid, clamp_to_grid, grid_points, resample_onto,
                                               voxel_correspondence, working_grid)

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 11, 9, 7, generator=gen)  # 3 channels
    # LIP-like image axes: x flipped, axes permuted, 1 mm, origin on whole millimetres
    affine = np.array([[-1.0, 0, 0, 20], [0, 0, -1, 15], [0, 1, 0, -4], [0, 0, 0, 1]])
    grid = working_grid(Grid((11, 9, 7), affine), 1.0, 4)
    grid = Grid((grid.shape[0] + 4, *grid.shape[1:]), grid.affine)  # reach outside the image on one side
    assert voxel_correspondence(affine, grid) is not None
    # another image's box, RAS, shifted by whole voxels and smaller: its border is replicated
    other = np.eye(4)
    other[:3, 3] = [12.0, -2.0, 6.0]
    boxes = {"none": None, "own": Grid((11, 9, 7), affine), "other": Grid((6, 5, 4), other)}
    assert voxel_correspondence(other, grid) is not None  # the fast path is what is tested
    points = grid_points(grid, dtype=torch.float32)
    if boxes[box] is not None:
        points = clamp_to_grid(points, boxes[box])
    expected = sample_at(image, affine, points)
    fast = resample_onto(image, affine, grid, box=boxes[box])
    assert fast.shape == expected.shape
    assert float((fast - expected).abs().max()) < 1e-5
    assert torch.equal(resample_onto(image[0], affine, grid, box=boxes[box]), fast[0])


def test_resample_onto_falls_back_when_voxels_do_not_coincide():
    from deepsim.geometry import Grid, grid_points, resample_onto, voxel_correspondence

    image = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(1))
    affine = np.eye(4)
    half = Grid((6, 6, 6), np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 0.5]] + [[0] * 4] * 3))
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]]
    for grid in (half, Grid((6, 6, 6), oblique), Grid((4, 4, 4), np.diag([2.0, 2.0, 2.0, 1.0]))):
        assert voxel_correspondence(affine, grid) is None
        expected = sample_at(image, affine, grid_points(grid, dtype=torch.float32))
        assert torch.allclose(resample_onto(image, affine, grid), expected)
