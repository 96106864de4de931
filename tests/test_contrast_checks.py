"""The product never fails silently: contrast detection on real anatomy, plausibility of affines, warnings."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.data.contrasts import render_contrast
from deepsim.data.embedded import embedded_label_paths
from deepsim.data.synthesis import brain_mask
from deepsim.geometry import Grid
from deepsim.registration.affine import AffineResult
from deepsim.registration.checks import (DIFFERENT_BELOW, MAX_SHEAR, SCALE_RANGE, affine_warnings, choose_contrast,
                                         intensity_relation, result_warnings)
from deepsim.registration.pipeline import Registration

SPACING = 3.0  # real donors at 3 mm: 60 x 70 x 60 voxels, a second per render


def _rotation(degrees: float, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    t = np.deg2rad(degrees)
    out = np.eye(4)
    out[:3, :3] = [[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]
    out[:3, 3] = shift
    return out


@pytest.fixture(scope="module")
def donors() -> dict[str, dict]:
    """Two embedded donors at 3 mm, each in the three contrasts: {donor: {"t1": tensor, ..., "affine": 4x4}}."""
    out = {}
    for donor in ("10021", "15496"):
        label = nib.load(embedded_label_paths()[donor])
        step = int(round(SPACING / float(np.linalg.norm(label.affine[:3, 0]))))
        values = np.asarray(label.dataobj)[::step, ::step, ::step]
        affine = label.affine @ np.diag([step, step, step, 1.0])
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        masks = brain_mask(values, spacing)
        out[donor] = {c: torch.as_tensor(render_contrast(values, spacing, c, seed=int(donor) % 97, masks=masks))
                      for c in ("t1", "t2", "pd")}
        out[donor]["affine"] = affine
    return out


def test_one_contrast_relates_positively_and_t1_against_t2_or_pd_negatively(donors):
    a, b = donors["10021"], donors["15496"]
    relation = {(fc, mc): intensity_relation(a[fc], a["affine"], b[mc], b["affine"])
                for fc, mc in [("t1", "t1"), ("t2", "t2"), ("t1", "t2"), ("t1", "pd"), ("t2", "t1"), ("t2", "pd")]}
    for same in [("t1", "t1"), ("t2", "t2")]:
        assert relation[same] > DIFFERENT_BELOW + 0.1, relation
    for different in [("t1", "t2"), ("t1", "pd"), ("t2", "t1")]:
        assert relation[different] < DIFFERENT_BELOW - 0.1, relation
    assert relation[("t2", "pd")] > DIFFERENT_BELOW  # documented: a monotone relation reads as one contrast


def test_the_relation_holds_when_the_moving_image_lies_elsewhere_in_world_space(donors):
    a, b = donors["10021"], donors["15496"]
    moved = _rotation(10.0, (25.0, -30.0, 15.0)) @ b["affine"]
    assert intensity_relation(a["t1"], a["affine"], b["t1"], moved) > DIFFERENT_BELOW + 0.1
    assert intensity_relation(a["t1"], a["affine"], b["t2"], moved) < DIFFERENT_BELOW - 0.1


def test_choose_contrast_follows_what_it_is_told_and_still_measures(donors):
    a, b = donors["10021"], donors["15496"]
    told = choose_contrast("same", a["t1"], a["affine"], b["t2"], b["affine"])
    assert (told.used, told.detected) == ("same", "different")
    auto = choose_contrast("auto", a["t1"], a["affine"], b["t2"], b["affine"])
    assert auto.used == "different" and auto.to_dict()["path"]["affine_metric"] == "mi"
    with pytest.raises(ValueError, match="contrast must be one of auto, same, different"):
        choose_contrast("t2", a["t1"], a["affine"], b["t2"], b["affine"])


def test_images_too_small_to_measure_keep_the_one_contrast_path():
    tiny = torch.rand(6, 6, 6)
    choice = choose_contrast("auto", tiny, np.eye(4), tiny, np.eye(4))
    assert np.isnan(choice.relation) and choice.used == "same" and choice.to_dict()["relation"] is None


GRID = Grid((100, 120, 100), np.diag([2.0, 2.0, 2.0, 1.0]))  # 200 x 240 x 200 mm
CENTRE = np.array([99.0, 119.0, 99.0])  # of the grid's voxel centres, mm


def _linear(matrix) -> np.ndarray:
    """A linear map about the grid's centre, as the affine stage's (which turn about the centre of mass)."""
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = CENTRE - out[:3, :3] @ CENTRE
    return out


@pytest.mark.parametrize("matrix, problem", [
    (np.eye(4), None),
    (_linear(_rotation(30.0)[:3, :3]), None),  # rotations are plausible
    (_linear(np.diag([1.2, 0.9, 1.1])), None),
    (_linear(np.diag([0.5, 1.0, 1.0])), "scales"),
    (_linear(np.diag([1.0, 1.0, 1.7])), "scales"),
    (_linear(np.diag([1.0, -1.0, 1.0])), "reflects"),
    (_linear([[1.0, MAX_SHEAR + 0.15, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "shears"),
    (_rotation(0.0, (0.0, 70.0, 0.0)), "moves"),  # 70 mm of a 240 mm field of view
    (_rotation(0.0, (0.0, 50.0, 0.0)), None),
], ids=["identity", "rotation", "mild-scale", "shrink", "stretch", "reflection", "shear", "shift", "small-shift"])
def test_affine_warnings_name_each_implausible_part(matrix, problem):
    warnings = affine_warnings(matrix, np.eye(4), GRID)
    if problem is None:
        assert warnings == []
    else:
        assert len(warnings) >= 1 and any(problem in w for w in warnings), warnings


def test_the_shift_is_measured_from_the_centre_of_mass_start():
    start = _rotation(0.0, (0.0, 70.0, 0.0))
    assert affine_warnings(start, start, GRID) == []
    assert SCALE_RANGE[0] < 1 < SCALE_RANGE[1]


def _registration(matrix: np.ndarray, shape, affine) -> Registration:
    grid = Grid(tuple(shape), affine)
    return Registration(matrix, torch.zeros(1, 3, *shape), grid, affine=AffineResult(matrix, [], [], 0.0))


def test_a_result_less_similar_than_the_inputs_warns_and_a_better_one_does_not(donors):
    a = donors["10021"]
    shape, affine = a["t1"].shape, a["affine"]
    shifted = affine.copy()
    shifted[:3, 3] += (12.0, 0.0, 0.0)  # the same image, 12 mm away in world space
    good, numbers = result_warnings(a["t1"], affine, a["t1"], shifted, _registration(
        _rotation(0.0, (12.0, 0.0, 0.0)), shape, affine))
    assert good == [] and numbers["nmi_final"] > numbers["nmi_start"]
    bad, numbers = result_warnings(a["t1"], affine, a["t1"], affine, _registration(
        _rotation(0.0, (12.0, 0.0, 0.0)), shape, affine))
    assert numbers["nmi_final"] < numbers["nmi_start"] and any("less similar" in w for w in bad), bad


def test_the_report_names_the_contrast_decision_and_lists_warnings(tmp_path, donors):
    """register_files records the decision and its warnings (here: T2 declared the same contrast as T1)."""
    from deepsim.registration.inference import register_files

    a, b = donors["10021"], donors["15496"]
    fixed, moving = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(a["t1"].numpy(), a["affine"]), fixed)
    nib.save(nib.Nifti1Image(b["t2"].numpy(), b["affine"]), moving)
    written = register_files(fixed, moving, tmp_path / "out", contrast="same", network=False, iterations=(5, 0, 0),
                             progress=False)
    report = json.loads(written["report"].read_text())
    assert report["contrast"]["requested"] == "same" and report["contrast"]["detected"] == "different"
    assert report["affine_metric"] == "ncc" and report["instance_optimisation"]["loss"] == "ncc"
    assert any("--contrast same" in w for w in report["warnings"])
