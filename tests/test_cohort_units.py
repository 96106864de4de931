"""Pieces of ``deepsim cohort``: BIDS and CSV inputs, the template, derivative names, robust outliers, output place."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepsim.data.bids import CohortItem, find_t1w, read_subjects_csv
from deepsim.data.templates import DEFAULT_TEMPLATE, load_template
from deepsim.errors import DatasetError, OutputError
from deepsim.evaluation.group_report import flag_outliers, robust_z
from deepsim.workflows.cohort import check_output_location
from deepsim.workflows.cohort_outputs import output_names


def _image(path: Path, shape=(6, 7, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(path))
    return path


def _dataset(root: Path) -> Path:
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    _image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _image(root / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_T1w.nii.gz")
    _image(root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_run-1_T1w.nii.gz")
    _image(root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_run-2_T1w.nii.gz")
    _image(root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_T2w.nii.gz")
    labels = root / "derivatives" / "labels"
    (labels).mkdir(parents=True)
    (labels / "dataset_description.json").write_text(json.dumps({"Name": "l", "BIDSVersion": "1.10.0"}))
    _image(labels / "sub-01" / "anat" / "sub-01_desc-tissue_dseg.nii.gz")
    _image(labels / "sub-01" / "anat" / "sub-01_desc-dk_dseg.nii.gz")
    return root


def test_bids_t1w_images_one_per_subject_and_session_with_their_labels(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    items = find_t1w(root, labels_dir=root / "derivatives" / "labels", atlas="tissue")
    assert [(i.subject, i.session) for i in items] == [("01", None), ("02", "a"), ("02", "b")]
    assert items[0].labels.name == "sub-01_desc-tissue_dseg.nii.gz" and items[1].labels is None
    assert items[2].t1w.name == "sub-02_ses-b_run-1_T1w.nii.gz"
    assert "run-2" in capsys.readouterr().err  # the image left out is named
    assert [i.prefix for i in find_t1w(root, ["sub-02"])] == ["sub-02_ses-a", "sub-02_ses-b"]
    assert items[2].folder == Path("sub-02/ses-b/anat")


@pytest.mark.parametrize("case, match", [("missing_label", "no folder for participant"),
                                          ("no_description", "not a BIDS dataset"), ("bad_label", "not a BIDS label")])
def test_bad_bids_inputs_are_one_line_errors(tmp_path, case, match):
    root = _dataset(tmp_path / "ds")
    labels = ["07"] if case == "missing_label" else ["0 1"] if case == "bad_label" else None
    if case == "no_description":
        (root / "dataset_description.json").unlink()
    with pytest.raises(DatasetError, match=match):
        find_t1w(root, labels)


def test_subjects_csv_resolves_paths_and_refuses_repeats(tmp_path):
    t1 = _image(tmp_path / "imgs" / "a.nii.gz")
    csv = tmp_path / "list.csv"
    csv.write_text("subject,session,t1w\n01,,imgs/a.nii.gz\n02,x,imgs/a.nii.gz\n")
    items = read_subjects_csv(csv)
    assert items == [CohortItem("01", None, t1), CohortItem("02", "x", t1)]
    csv.write_text("subject,t1w\n01,imgs/a.nii.gz\n01,imgs/a.nii.gz\n")
    with pytest.raises(DatasetError, match="line 3: sub-01 listed twice"):
        read_subjects_csv(csv)
    csv.write_text("subject,t1w\n01,imgs/missing.nii.gz\n")
    with pytest.raises(DatasetError, match="missing.nii.gz not found"):
        read_subjects_csv(csv)


def test_default_template_ships_with_a_tissue_atlas_and_resamples_by_res():
    full = load_template()
    assert full.name == DEFAULT_TEMPLATE and full.shape == (197, 233, 189)
    assert set(np.unique(full.atlas)) == {0, 1, 2, 3} and full.atlas_labels == {1: "CSF", 2: "GM", 3: "WM"}
    assert ((full.atlas > 0) == (full.t1w > 0)).all()  # every brain voxel has a class, nothing outside
    coarse = load_template(f"{DEFAULT_TEMPLATE}:res-4")
    assert np.allclose(np.linalg.norm(coarse.affine[:3, :3], axis=0), 4.0)
    assert np.allclose(coarse.affine[:3, 3], full.affine[:3, 3])  # same first voxel centre, same field of view
    # brain volume kept within a few percent through resampling
    assert abs((coarse.atlas > 0).sum() * 64 / (full.atlas > 0).sum() - 1) < 0.05


def test_derivative_names_follow_fmriprep():
    names = output_names(CohortItem("01", "a", Path("x")), "MNI152NLin2009aSym", "tissue")
    assert names["t1w"] == "sub-01_ses-a_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"
    assert names["to_template"] == "sub-01_ses-a_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz"
    assert names["from_template"] == "sub-01_ses-a_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.nii.gz"
    assert names["dseg"] == "sub-01_ses-a_desc-tissue_dseg.nii.gz"
    assert names["jacobian"] == "sub-01_ses-a_space-MNI152NLin2009aSym_jacobian.nii.gz"


def test_robust_z_flags_the_outlier_and_ignores_spread_free_metrics():
    values = [0.50, 0.52, 0.49, 0.51, 0.50, 0.20]
    z = robust_z(values)
    assert abs(z[-1]) > 3.5 and np.all(np.abs(z[:-1]) < 2)
    # median 0.5, MAD 0.01 -> z of 0.20 = -0.30 / 0.014826
    assert z[-1] == pytest.approx(-0.30 / (1.4826 * 0.01))
    rows = [{"dice": v, "folding_pct": 0.0} for v in values]
    flags = flag_outliers(rows, ["dice", "folding_pct"])
    assert flags[-1] and flags[-1][0].startswith("dice") and not any(flags[:-1])
    assert flag_outliers(rows[:3], ["dice"]) == [[], [], []]  # too few subjects to call anything an outlier


def test_output_never_inside_the_raw_dataset_except_derivatives(tmp_path):
    raw = tmp_path / "ds"
    raw.mkdir()
    check_output_location(raw, raw / "derivatives" / "deepsim")
    check_output_location(raw, tmp_path / "out")
    for bad in (raw, raw / "sub-01", tmp_path):
        with pytest.raises(OutputError):
            check_output_location(raw, bad)


@pytest.mark.slow
def test_torchrun_ranks_share_the_subjects_by_striding_and_finish_them_all(tmp_path):
    """2 gloo ranks on the CPU: rank r registers subjects r, r + 2, ...; every subject ends complete."""
    import os
    import subprocess
    import sys

    import torch

    from deepsim.data.example_study import make_example_dataset
    from deepsim.engine.checkpoints import save_checkpoint
    from deepsim.registration.network import RegistrationNet

    raw = make_example_dataset(tmp_path / "raw", n_subjects=4, spacing_mm=4.0, seed=2)
    kwargs = dict(spatial_dims=3, in_channels=1, channels=[4, 8, 8])
    model = save_checkpoint(tmp_path / "model.pt", RegistrationNet(**kwargs), "registration_net", kwargs,
                            meta={"similarity": "ncc", "spacing_mm": 4.0})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "deepsim.cli", "cohort", str(raw), str(out), "participant", "--template", "MNI152NLin2009aSym:res-4",
               "--model", str(model), "--speed", "fast", "--no-progress"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = {}
    for marker in sorted(out.glob("sub-*/anat/*_registration.json")):
        summary = json.loads(marker.read_text())
        ranks[summary["subject"]] = summary["rank"]
    assert ranks == {"01": 0, "02": 1, "03": 0, "04": 1}
    assert (out / "failures.csv").read_text().splitlines() == ["subject,session,t1w,error,time"]


def test_cohort_passes_its_transform_to_the_optimiser_and_refuses_symmetric_with_a_deepsim_model():
    """--transform reaches the instance optimisation and the settings fingerprint (a rerun with another transform
    redoes the subjects); a model trained with a DeepSim loss cannot run symmetric: one ConfigError, before output."""
    from types import SimpleNamespace

    from deepsim.errors import ConfigError
    from deepsim.workflows.cohort import CohortSettings, _registrar

    model = SimpleNamespace(similarity="ncc", models_dir=None, network=None, spacing_mm=2.0, size_multiple=1)
    assert _registrar(model, "fast", "cpu", "symmetric").optimiser.transform == "symmetric"
    assert _registrar(model, "fast", "cpu").optimiser.transform == "greedy"
    template = SimpleNamespace(name="T", sources=[], atlas_name=None)
    assert CohortSettings().fingerprint(template, "m.pt")["transform"] == "greedy"
    assert CohortSettings(transform="symmetric").fingerprint(template, "m.pt")["transform"] == "symmetric"
    with pytest.raises(ConfigError, match="--transform symmetric cannot use the loss deepsim-seg"):
        _registrar(SimpleNamespace(**{**vars(model), "similarity": "deepsim-seg"}), "fast", "cpu", "symmetric")
