"""MLflow models and the Model Registry: after `deepsim run --profile quick` the registered network loads with
mlflow.pytorch.load_model("models:/...") and `deepsim register --model models:/...` registers a pair; resolved
settings are params, the datalist splits are dataset inputs, source tags and system metrics are standard."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from deepsim.tracking.settings import resolved_settings


def _boom():
    raise AssertionError("a component was instantiated while reading settings")


def test_resolved_settings_are_plain_values_and_instantiate_nothing():
    parser = ConfigParser({
        "imports": ["$import torch"],
        "lr": 0.001,
        "lambdas": {"mse": 0.1, "ncc": 1.0},
        "similarity": "ncc",
        "weight": "$@lambdas[@similarity]",
        "device": "$torch.device('cpu')",
        "out": "o",
        "models": "$@out + '/models'",
        "net_kwargs": {"channels": [4, 8], "dims": "@dims"},
        "dims": 3,
        "component": {"_target_": f"{__name__}._boom"},
        "uses_component": "$@component",
        "nested_ref": "@train#handlers",
        "train": {"handlers": [{"_target_": f"{__name__}._boom"}]},
        "run": ["$@component"],
    })
    parser.parse()
    settings = resolved_settings(parser)
    assert settings == {"lr": 0.001, "lambdas": {"mse": 0.1, "ncc": 1.0}, "similarity": "ncc", "weight": 1.0,
                        "device": "cpu", "out": "o", "models": "o/models", "dims": 3,
                        "net_kwargs": {"channels": [4, 8], "dims": 3}}


def _tiny_model_in_store(tmp_path):
    import mlflow

    from deepsim.engine.checkpoints import registration_checkpoint_path, save_checkpoint
    from deepsim.registration.network import RegistrationNet
    from deepsim.tracking.models import log_network_model

    kwargs = {"spatial_dims": 2, "in_channels": 1, "channels": [4, 8]}
    path = save_checkpoint(registration_checkpoint_path(tmp_path, "mse"), RegistrationNet(**kwargs),
                           "registration_net", kwargs, {"spacing_mm": 1.5, "similarity": "mse",
                                                        "regularization_weight": 0.1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tiny")
    with mlflow.start_run():
        info = log_network_model(path, "registration_mse")
    return uri, info


def test_a_logged_model_has_signature_example_and_our_checkpoint_and_loads_by_uri(tmp_path, monkeypatch):
    import mlflow

    from deepsim.errors import CheckpointError
    from deepsim.registration.model import resolve_model
    from deepsim.tracking.models import register_best

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, info = _tiny_model_in_store(tmp_path)
    logged = mlflow.models.get_model_info(info.model_uri)
    assert list(logged.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 2, -1, -1]
    assert logged.saved_input_example_info is not None and logged.metadata["spacing_mm"] == 1.5
    loss, version, alias = register_best({"mse": (info.model_uri, 0.5), "ncc": (info.model_uri, float("nan"))},
                                         "tiny")
    assert (loss, version, alias) == ("mse", "models:/deepsim-tiny/1", "models:/deepsim-tiny@best")
    for spec in (version, alias, info.model_uri):
        model = resolve_model(spec, tracking_uri=uri)
        assert model.spacing_mm == 1.5 and model.similarity == "mse" and model.checkpoint.name == "registration_mse.pt"
    with pytest.raises(CheckpointError, match="models:/deepsim-tiny/9"):
        resolve_model("models:/deepsim-tiny/9", tracking_uri=uri)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The real command, in its own process, stdout and stderr redirected (not a terminal)."""
    out = tmp_path_factory.mktemp("quick")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # one sample a second: a short run still gets some
    proc = subprocess.run([sys.executable, "-m", "deepsim", "run", "--profile", "quick", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_quick_profile_main_job_writes_mlflow_runs_and_finite_metrics(quick_run):
    import mlflow
    import pandas as pd

    out, proc = quick_run
    assert "| identity |" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    results = pd.read_csv(out / "report" / "results.csv")
    # the networks alone, and the quick profile's accurate-path rows: the affine stage and the hybrid mse+io
    assert set(results["method"]) == {"identity", "affine", "mse", "ncc", "deepsim-ae", "deepsim-seg", "mse+io"}
    assert all(math.isfinite(v) for v in results[["dice_mean", "folding_pct", "std_logjac"]].to_numpy().ravel())
    for png in ("dice_boxplot.png", "overlay_mse.png", "grid_deepsim-seg.png", "jacobian_ncc.png"):
        assert (out / "report" / png).stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quick")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"preprocess", "feature_ae", "feature_seg", "registration-mse", "registration-ncc",
            "registration-deepsim-ae", "registration-deepsim-seg", "evaluation"} <= set(runs)
    reg = runs["registration-ncc"]
    assert math.isfinite(reg.data.metrics["test/dice_mean"]) and math.isfinite(reg.data.metrics["train/loss"])
    assert reg.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in runs.values()}


@pytest.mark.slow
def test_quick_run_prints_only_results_on_stdout_and_no_bars_into_a_redirected_log(quick_run):
    _, proc = quick_run
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if " - INFO - " in line or "WARNING" in line or "[deepsim]" in line]
    # the table (2 + 7 rows), two stage comparisons, the report and MLflow lines: nothing else
    assert any(line.startswith("| deepsim-seg |") for line in lines) and len(lines) <= 20
    assert any(line.startswith("mse+io vs affine: Dice") for line in lines)
    assert "\r" not in proc.stderr and "%|" not in proc.stderr
    assert "registered model: models:/deepsim-quick/1 (models:/deepsim-quick@best)" in proc.stderr


@pytest.mark.slow
def test_registered_model_loads_with_mlflow_and_registers_a_pair_with_deepsim(quick_run, tmp_path, monkeypatch):
    import mlflow
    import nibabel as nib

    from deepsim.cli import main
    from deepsim.engine.checkpoints import load_network

    out, _ = quick_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("deepsim-quick", "best")
    loss = version.tags["similarity"]
    network = mlflow.pytorch.load_model(f"models:/deepsim-quick/{version.version}")
    reference = load_network(out / "models" / f"registration_{loss}.pt").eval()
    pair = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(network(pair), reference(pair)) and network(pair).shape == (1, 3, 32, 32, 32)

    datalist = json.loads((out / "data" / "datalist.json").read_text())
    fixed, moving = datalist["test"][0], datalist["test"][-1]
    data = out / "data"
    assert main(["register", "--fixed", str(data / fixed["image"]), "--moving", str(data / moving["image"]),
                 "--fixed-label", str(data / fixed["label"]), "--moving-label", str(data / moving["label"]),
                 "--model", f"models:/deepsim-quick/{version.version}", "--tracking-uri", uri,
                 "--out", str(tmp_path / "reg")]) == 0
    report = json.loads((tmp_path / "reg" / "registration.json").read_text())
    assert report["similarity"] == loss and report["dice_after"] > 0
    assert nib.load(tmp_path / "reg" / "ddf_mm.nii.gz").shape[:3] == nib.load(data / fixed["image"]).shape


@pytest.mark.slow
def test_runs_carry_settings_inputs_models_source_tags_and_system_metrics(quick_run, monkeypatch):
    import mlflow

    from deepsim.tracking.mlflow_tracking import git_commit

    out, _ = quick_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["quick"], output_format="list")}
    reg = runs["registration-deepsim-seg"]
    assert {"learning_rate": "0.001", "diffeomorphic": "False", "precision": "fp32",
            "similarity": "deepsim-seg", "device": "cpu"}.items() <= reg.data.params.items()
    assert float(reg.data.params["regularization_weight"]) > 0 and "max_epochs" in reg.data.params
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in reg.inputs.dataset_inputs}
    assert contexts == {"toy/training": ["training"], "toy/validation": ["validation"]}
    assert [i.dataset.name for i in runs["evaluation"].inputs.dataset_inputs] == ["toy/test"]
    for name in ("registration-deepsim-seg", "registration-mse", "feature_seg"):
        (model,) = runs[name].outputs.model_outputs
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert info.signature is not None and info.saved_input_example_info is not None
    parent = next(r for n, r in runs.items() if n.startswith("pipeline-quick"))
    commit = git_commit()
    for run in (parent, reg):
        assert run.data.tags.get("mlflow.source.git.commit") == (None if commit == "unknown" else commit)
        assert "git_commit" not in run.data.tags and run.data.tags["deepsim.version"]
    assert any(key.startswith("system/cpu_utilization") for key in parent.data.metrics)


def test_bundle_inference_takes_a_registered_model(tmp_path, monkeypatch):
    """inference.json's --model accepts models:/<name>@<alias> (here a tiny 2D network in a local store)."""
    import nibabel as nib
    import numpy as np

    from deepsim.tracking.models import register_best
    from deepsim.workflow import bundle_dir, run_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, info = _tiny_model_in_store(tmp_path)
    register_best({"mse": (info.model_uri, 0.5)}, "tiny")
    rng = np.random.default_rng(0)
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(rng.random((20, 24)).astype(np.float32), np.diag([1.5, 1.5, 1, 1])),
                 tmp_path / f"{name}.nii.gz")
    run_stage("inference", {"output_dir": str(tmp_path / "out"), "model": "models:/deepsim-tiny@best",
                            "tracking_uri": uri, "fixed": str(tmp_path / "fixed.nii.gz"),
                            "moving": str(tmp_path / "moving.nii.gz"), "progress": False},
              bundle=bundle_dir("cells_2d"))
    report = json.loads((tmp_path / "out" / "inference" / "registration.json").read_text())
    assert report["model"].endswith("extra_files/registration_mse.pt") and report["model_spacing_mm"] == 1.5


def test_a_datalist_with_integer_columns_is_logged_as_inputs_without_warnings(tmp_path, recwarn):
    """The default profile's datalist holds integer seeds; MLflow's schema hint about them reached every user's
    stderr once per stage."""
    import mlflow

    from deepsim.tracking import mlflow_tracking as tracking

    datalist = tmp_path / "datalist.json"
    row = {"image": "a.nii.gz", "label": "a_seg.nii.gz", "subject": "a", "synthesis_seed": 7, "augmentation_seed": None}
    datalist.write_text(json.dumps({"training": [row, {**row, "synthesis_seed": 8}]}))
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        # its own experiment: an earlier test may have left another store's experiment active in this process
        experiment = mlflow.MlflowClient().create_experiment("datalist")
        with mlflow.start_run(experiment_id=experiment) as run:
            tracking.log_datalist(datalist, "brains", {"training": "training"})
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    finally:
        mlflow.set_tracking_uri(before)
    assert [d.dataset.name for d in inputs] == ["brains/training"]
    assert not [w for w in recwarn if "Hint" in str(w.message)]
