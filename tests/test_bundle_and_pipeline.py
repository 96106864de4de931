"""Bundle configs parse and run stage by stage; the CLI reports bad profiles and data in one line. (The quick
profile of the whole main job runs once, as a real command, in tests/test_mlflow_models.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from deepsim.cli import main
from deepsim.workflow import STAGE_FILES, bundle_dir, run_stage

BUNDLE = bundle_dir()
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bundle, spatial_dims", [("brain_mri", 3), ("cells_2d", 2)])
@pytest.mark.parametrize("stage", sorted(STAGE_FILES))
def test_every_bundle_config_parses_with_common(stage, bundle, spatial_dims):
    configs = bundle_dir(bundle) / "configs"
    parser = ConfigParser()
    parser.read_meta(configs / "metadata.json")
    parser.read_config([str(configs / "common.json"), str(configs / STAGE_FILES[stage])])
    parser.parse()
    assert "run" in parser.get() and parser.get_parsed_content("spatial_dims") == spatial_dims


def test_installed_bundle_is_the_repository_bundle():
    for name in ("common.json", "train_registration.json"):
        assert json.loads((BUNDLE / "configs" / name).read_text()) == json.loads(
            (REPO / "bundles" / "brain_mri" / "configs" / name).read_text())


@pytest.mark.parametrize("stage", ["feature_ae", "feature_seg"])
def test_two_iteration_feature_stage_writes_its_checkpoint(quick_common, stage):
    run_stage(stage, {**quick_common, "max_epochs": 1, "epoch_length": 2})
    assert (Path(quick_common["output_dir"]) / "models" / f"{stage}.pt").is_file()


@pytest.mark.parametrize("similarity", ["mse", "ncc", "deepsim-seg"])
def test_two_iteration_registration_then_evaluation_and_inference(quick_common, similarity):
    if similarity == "deepsim-seg":
        run_stage("feature_seg", {**quick_common, "max_epochs": 1, "epoch_length": 1})
    run_stage("registration", {**quick_common, "similarity": similarity, "max_epochs": 1, "epoch_length": 2,
                               "validation_pairs": 1})
    out = Path(quick_common["output_dir"])
    assert (out / "models" / f"registration_{similarity}.pt").is_file()
    parser = run_stage("evaluate", {**quick_common, "methods": ["identity", similarity]})
    summary = parser.get_parsed_content("evaluate")
    assert list(summary["method"]) == ["identity", similarity]
    datalist = json.loads((out / "data" / "datalist.json").read_text())
    fixed, moving = datalist["test"][0], datalist["test"][-1]
    data_dir = out / "data"
    run_stage("inference", {**quick_common, "model": str(out), "similarity": similarity,
                            "fixed": str(data_dir / fixed["image"]),
                            "moving": str(data_dir / moving["image"]),
                            "moving_label": str(data_dir / moving["label"])})
    for name in ("warped.nii.gz", "ddf_mm.nii.gz", "warped_label.nii.gz"):
        assert (out / "inference" / name).is_file()


def test_cli_reports_bad_profile_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepsim.cli", "run", "--profile", str(tmp_path / "nope.json"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "nope.json" in proc.stderr


def test_cli_reports_unknown_loss_in_one_line(tmp_path, capsys):
    assert main(["run", "--profile", "quick", "--losses", "vgg", "--out", str(tmp_path / "out")]) == 2
    assert "unknown losses ['vgg']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _write_profile(tmp_path, dataset):
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile["common"]["dataset"] = str(dataset)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    return path


@pytest.mark.parametrize("problem", ["4d", "other_grid"])
def test_bad_user_data_stops_the_main_job_with_one_line_naming_the_file(tmp_path, problem):
    import nibabel as nib
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        image = np.random.default_rng(i).random((32, 32, 32)).astype(np.float32)
        label = (image > 0.5).astype(np.int16)
        affine = np.eye(4)
        if problem == "4d" and i == 2:
            image = np.stack([image, image], axis=-1)
        if problem == "other_grid" and i == 2:
            affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image, np.eye(4)), data / f"s{i}_image.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), data / f"s{i}_label.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "deepsim.cli", "run", "--profile", str(_write_profile(tmp_path, data)),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("deepsim: error: DatasetError:") and "s2_" in last
    assert not (out / "data" / "datalist.json").exists()


@pytest.mark.slow
def test_stage_runs_with_monai_bundle_command_line(tmp_path):
    configs = BUNDLE / "configs"
    files = f"['{configs / 'common.json'}','{configs / 'preprocess.json'}']"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
                           "--output_dir", str(tmp_path / "out"), "--dataset", "toy"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "data" / "datalist.json").is_file()
