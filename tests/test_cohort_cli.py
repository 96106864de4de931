"""``deepsim cohort`` end to end on the example study: a bad file among good ones, an interrupted run resumed, the
derivatives read back (ITK applies the transforms), the group report opened in a headless browser, the raw dataset
untouched. At 4 mm with an untrained 4 mm model, so it checks the plumbing, not the accuracy."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.data.example_study import make_example_dataset
from deepsim.engine.checkpoints import save_checkpoint
from deepsim.registration.network import RegistrationNet

pytestmark = pytest.mark.slow

SPACE = "MNI152NLin2009aSymres4"
# one thread per process: the machine is shared, and two oversubscribed threads ran 10x slower than one here
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _model(path: Path) -> Path:
    kwargs = dict(spatial_dims=3, in_channels=1, channels=[4, 8, 8])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = RegistrationNet(**kwargs)
    return save_checkpoint(path, net, "registration_net", kwargs,
                           meta={"similarity": "ncc", "spacing_mm": 4.0, "regularization_weight": 1.0})


def _cohort(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepsim.cli", "cohort", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """Participant level run twice (the first killed once a subject is complete) and the group level, on 5
    subjects of which sub-03's T1w file is corrupt."""
    root = tmp_path_factory.mktemp("cohort")
    raw = make_example_dataset(root / "raw", n_subjects=5, spacing_mm=4.0, seed=1)
    bad = raw / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated download
    before = _snapshot(raw)
    out = root / "out"
    args = [str(raw), str(out), "participant", "--template", f"MNI152NLin2009aSym:res-4", "--model",
            str(_model(root / "model.pt")), "--labels-dir", str(raw / "derivatives" / "labels"), "--speed", "fast",
            "--batch-size", "2", "--workers", "1", "--no-progress"]
    first = _cohort(*args)
    marker = out / "sub-01" / "anat" / "sub-01_registration.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # interrupted: after sub-01, before the end
    first.communicate()
    killed_after = sorted(p.name for p in out.glob("sub-*/anat/*_registration.json"))
    stamp = marker.stat().st_mtime_ns
    second = _cohort(*args)
    out2, err2 = second.communicate(timeout=900)
    group = _cohort(str(raw), str(out), "group")
    out3, err3 = group.communicate(timeout=600)
    return {"raw": raw, "out": out, "before": before, "killed_after": killed_after, "stamp": stamp,
            "second": (second.returncode, out2, err2), "group": (group.returncode, out3, err3)}


def test_a_bad_file_fails_its_subject_only_and_the_run_exits_1_naming_it(study):
    code, out, err = study["second"]
    assert code == 1
    assert err.strip().count("\n") == 0 and "sub-03" in err and "failures.csv" in err
    rows = (study["out"] / "failures.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("03,") and "sub-03_T1w.nii.gz" in rows[1]
    record = json.loads((study["out"] / "logs" / "failures" / "sub-03.json").read_text())
    assert "DatasetError" in record["error"] and record["traceback"]
    done = sorted(p.name for p in study["out"].glob("sub-*/anat/*_registration.json"))
    assert done == [f"sub-0{i}_registration.json" for i in (1, 2, 4, 5)]


def test_an_interrupted_run_resumes_without_redoing_finished_subjects(study):
    assert "sub-01_registration.json" in study["killed_after"]
    assert len(study["killed_after"]) < 4  # killed before the end
    marker = study["out"] / "sub-01" / "anat" / "sub-01_registration.json"
    assert marker.stat().st_mtime_ns == study["stamp"]  # skipped, not redone
    assert "already complete" in study["second"][1]
    assert not list(study["out"].glob(".sub-*"))  # no staging folder left behind


def test_the_raw_dataset_is_never_written(study):
    assert _snapshot(study["raw"]) == study["before"]


def test_derivatives_have_fmriprep_names_and_the_right_grids(study):
    out = study["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "deepsim"
    assert (out / "desc-tissue_dseg.tsv").read_text().splitlines() == ["index\tname", "1\tCSF", "2\tGM", "3\tWM"]
    anat = out / "sub-02" / "anat"
    subject = nib.load(study["raw"] / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    expected = {f"sub-02_space-{SPACE}_desc-preproc_T1w.nii.gz": "template",
                f"sub-02_from-T1w_to-{SPACE}_mode-image_xfm.nii.gz": "template",
                f"sub-02_from-{SPACE}_to-T1w_mode-image_xfm.nii.gz": "subject",
                f"sub-02_space-{SPACE}_jacobian.nii.gz": "template", "sub-02_desc-tissue_dseg.nii.gz": "subject"}
    template = nib.load(anat / f"sub-02_space-{SPACE}_desc-preproc_T1w.nii.gz")
    for name, grid in expected.items():
        image = nib.load(anat / name)
        reference = template if grid == "template" else subject
        assert image.shape[:3] == reference.shape[:3], name
        assert np.allclose(image.affine, reference.affine, atol=1e-4), name
    dseg = np.asarray(nib.load(anat / "sub-02_desc-tissue_dseg.nii.gz").dataobj)
    assert set(np.unique(dseg)) <= {0, 1, 2, 3} and (dseg > 0).mean() > 0.1
    summary = json.loads((anat / "sub-02_registration.json").read_text())
    assert set(summary["outputs"].values()) <= {p.name for p in anat.iterdir()}
    assert 0 <= summary["metrics"]["dice"] <= 1 and summary["metrics"]["folding_pct"] >= 0


def test_itk_applies_the_forward_transform_like_our_warped_image_and_the_inverse_undoes_it(study):
    """ITK (through SimpleITK, as tests/test_register.py) reads both fields as DisplacementFieldTransforms."""
    import SimpleITK as sitk

    anat = study["out"] / "sub-02" / "anat"
    raw_t1 = study["raw"] / "sub-02" / "anat" / "sub-02_T1w.nii.gz"

    def transform(path):
        return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))

    forward = transform(anat / f"sub-02_from-T1w_to-{SPACE}_mode-image_xfm.nii.gz")
    inverse = transform(anat / f"sub-02_from-{SPACE}_to-T1w_mode-image_xfm.nii.gz")
    moving = sitk.ReadImage(str(raw_t1), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(anat / f"sub-02_space-{SPACE}_desc-preproc_T1w.nii.gz"), sitk.sitkFloat32)
    resampled = sitk.Resample(moving, reference, forward, sitk.sitkLinear, 0.0)
    a, b = sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(reference)
    inside = b > 0.05 * b.max()
    assert np.abs(a - b)[inside].max() < 1e-2 * b.max()  # linear interpolation by ITK and by us: the same image
    # the inverse sends subject points to template points that the forward map sends back (4 mm voxels)
    errors = []
    for index in [(10, 12, 14), (20, 18, 22), (14, 25, 18), (24, 22, 30)]:
        point = moving.TransformIndexToPhysicalPoint(index)
        back = forward.TransformPoint(inverse.TransformPoint(point))
        errors.append(np.linalg.norm(np.subtract(back, point)))
    assert max(errors) < 1.0  # mm, a quarter voxel


def test_group_report_lists_metrics_failures_and_opens_in_a_browser_without_errors(study, tmp_path):
    code, out, err = study["group"]
    assert code == 1 and "1 subject(s) failed" in err
    report = study["out"] / "group_report.html"
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 4 and "sub-03_T1w.nii.gz" in text
    assert "http" not in text.replace("https://github.com", "")  # self-contained: nothing fetched
    metrics = (study["out"] / "group_metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("id,similarity_after,dice,dice_native,folding_pct") and len(metrics) == 5
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{study['out'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["deepsim-cohort"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and len(runs) == 5
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(parents["run_id"].iloc[0])]
    assert "group_report.html" in artifacts

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install -y chromium); the report was checked "
                    "as HTML only")
    shot = tmp_path / "report.png"
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert result.returncode == 0 and shot.is_file() and not console, console
