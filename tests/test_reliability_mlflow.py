"""Reliability: MLflow faults. An unreachable server stops the run at start-up (or, when asked, the run falls back
to a local store with a warning and is synced later); a failed artifact upload is retried, then reported and
turned into a non-zero exit, never dropped."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from deepsim.cli import main
from deepsim.errors import ConfigError, TrackingError
from deepsim.tracking import mlflow_tracking as tracking
from deepsim.tracking.sync import SYNC_TAG, sync_runs

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.fixture(autouse=True)
def _fresh_mlflow_state(monkeypatch):
    """No waiting between retries, no failures left over from another test, no run left active."""
    monkeypatch.setattr(tracking, "BACKOFF_S", 0.0)
    tracking._FAILED.clear()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking._FAILED.clear()


def _store(path: Path) -> str:
    return f"sqlite:///{path}"


# ------------------------------------------------------------------------------------------ unreachable server
def test_an_unreachable_server_stops_the_run_at_start_up_in_one_line_before_any_data(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--profile", "quick", "--tracking-uri", UNREACHABLE, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepsim: error: ConfigError: MLflow tracking URI {UNREACHABLE}: "
                                               "not reachable")
    assert not (out / "data").exists() and not (out / "run_record.json").exists()


def test_with_a_fallback_an_unreachable_server_gives_a_warning_and_the_local_store(tmp_path, capsys):
    local = _store(tmp_path / "mlflow.db")
    assert tracking.setup_tracking(UNREACHABLE, "exp", fallback_uri=local) == local
    warning = capsys.readouterr().err
    assert f"deepsim: warning: MLflow tracking URI {UNREACHABLE}: not reachable" in warning
    assert f"deepsim sync-runs --from {local} --to {UNREACHABLE}" in warning
    assert mlflow.get_tracking_uri() == local and mlflow.get_experiment_by_name("exp") is not None
    with pytest.raises(ConfigError, match="not reachable"):
        tracking.setup_tracking(UNREACHABLE, "exp")


# ---------------------------------------------------------------------------------------------- sync-runs
def _log_pipeline(uri: str, artifact_dir: Path) -> dict:
    """A parent run with two nested stage runs (one failed), params, a metric history, tags, artifacts; plus an
    unfinished run. Returns the source run ids by name."""
    Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # a store's folder must exist
    tracking.setup_tracking(uri, "quick")
    (artifact_dir / "report").mkdir(parents=True)
    (artifact_dir / "report" / "results.csv").write_text("method,dice\nmse,0.5\n")
    ids = {}
    with tracking.stage_run("pipeline", {"seed": "0"}, nested=False) as parent:
        tracking.log_params({"profile": "quick", "losses": ["mse"]})
        ids["pipeline"] = parent.info.run_id
        with tracking.stage_run("registration-mse", {"similarity": "mse"}) as run:
            ids["registration-mse"] = run.info.run_id
            for epoch, loss in enumerate([0.5, 0.4, 0.3], start=1):
                tracking.log_epoch_metrics({"train/loss": loss}, epoch)
            tracking.log_artifact(artifact_dir / "report", "report")
        with pytest.raises(RuntimeError):
            with tracking.stage_run("evaluation") as run:
                ids["evaluation"] = run.info.run_id
                raise RuntimeError("stage failed")
    ids["unfinished"] = MlflowClient(uri).create_run(mlflow.get_experiment_by_name("quick").experiment_id,
                                                      run_name="unfinished").info.run_id
    mlflow.set_tracking_uri("sqlite:///" + str(artifact_dir / "unused.db"))
    return ids


def _by_name(uri: str) -> dict:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quick")
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    return {r.info.run_name: r for r in runs}


def test_sync_runs_copies_params_metric_histories_artifacts_status_and_nesting_once(tmp_path):
    source, destination = _store(tmp_path / "local" / "mlflow.db"), _store(tmp_path / "server" / "mlflow.db")
    ids = _log_pipeline(source, tmp_path / "files")
    copied = sync_runs(source, destination)
    assert {s for s, _ in copied} == {ids["pipeline"], ids["registration-mse"], ids["evaluation"]}
    src, dst = _by_name(source), _by_name(destination)
    assert "unfinished" not in dst  # still RUNNING at the source: left for a later sync
    client = MlflowClient(destination)
    reg = dst["registration-mse"]
    assert reg.data.params == src["registration-mse"].data.params
    assert reg.data.tags["mlflow.parentRunId"] == dst["pipeline"].info.run_id
    assert dst["evaluation"].data.tags["mlflow.parentRunId"] == dst["pipeline"].info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(reg.info.run_id, "train/loss")] == \
        [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert (reg.info.status, dst["evaluation"].info.status, dst["pipeline"].info.status) == \
        ("FINISHED", "FAILED", "FINISHED")
    assert reg.info.start_time == src["registration-mse"].info.start_time
    assert reg.info.end_time == src["registration-mse"].info.end_time
    assert dst["pipeline"].data.params == {"profile": "quick", "losses.0": "mse"}
    local = client.download_artifacts(reg.info.run_id, "report/results.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == "method,dice\nmse,0.5\n"
    assert reg.data.tags[SYNC_TAG] == ids["registration-mse"]
    assert sync_runs(source, destination) == []  # a second sync copies nothing twice
    assert len(_by_name(destination)) == 3


def test_sync_runs_redoes_a_copy_an_interrupted_sync_left_unfinished(tmp_path, monkeypatch):
    source, destination = _store(tmp_path / "a.db"), _store(tmp_path / "b.db")
    ids = _log_pipeline(source, tmp_path / "files")
    calls = []

    def die_on_second_run(self, run_id, status="FINISHED", end_time=None):
        calls.append(run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, run_id, status, end_time)

    original = MlflowClient.set_terminated
    monkeypatch.setattr(MlflowClient, "set_terminated", die_on_second_run)
    with pytest.raises(KeyboardInterrupt):
        sync_runs(source, destination)
    monkeypatch.setattr(MlflowClient, "set_terminated", original)
    assert len(sync_runs(source, destination)) == 2
    dst = _by_name(destination)
    assert len(dst) == 3 and all(r.info.status in ("FINISHED", "FAILED") for r in dst.values())
    client = MlflowClient(destination)
    every = client.search_runs([client.get_experiment_by_name("quick").experiment_id], run_view_type=ViewType.ALL)
    assert len(every) == 4  # the half-made copy of the interrupted sync is deleted
    assert {r.data.tags[SYNC_TAG] for r in dst.values()} == {ids["pipeline"], ids["registration-mse"],
                                                            ids["evaluation"]}


def test_sync_runs_refuses_a_missing_source_or_an_unreachable_destination_in_one_line(tmp_path, capsys):
    assert main(["sync-runs", "--from", _store(tmp_path / "none.db"), "--to", _store(tmp_path / "b.db")]) == 1
    assert "ConfigError: --from sqlite:///" in capsys.readouterr().err
    _log_pipeline(_store(tmp_path / "a.db"), tmp_path / "files")
    capsys.readouterr()
    assert main(["sync-runs", "--from", _store(tmp_path / "a.db"), "--to", UNREACHABLE]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"destination tracking URI {UNREACHABLE}: not reachable" in err[0]


# ------------------------------------------------------------------------------------------- artifact uploads
def test_a_failing_upload_is_retried_and_succeeds_without_a_report(tmp_path, monkeypatch):
    tracking.setup_tracking(_store(tmp_path / "mlflow.db"), "exp")
    attempts = []
    real = mlflow.log_artifact

    def flaky(local_path, artifact_path=None, **kwargs):
        attempts.append(local_path)
        if len(attempts) < 3:
            raise ConnectionError("server busy")
        return real(local_path, artifact_path, **kwargs)

    monkeypatch.setattr(mlflow, "log_artifact", flaky)
    (tmp_path / "model.pt").write_bytes(b"weights")
    with tracking.stage_run("stage", nested=False) as run:
        tracking.log_artifact(tmp_path / "model.pt", "checkpoint")
    assert len(attempts) == 3 and tracking.failed_uploads() == []
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]


def test_an_upload_failing_after_its_retries_is_reported_with_its_local_path_and_fails_the_job(tmp_path,
                                                                                                monkeypatch, capsys):
    tracking.setup_tracking(_store(tmp_path / "mlflow.db"), "exp")
    monkeypatch.setattr(mlflow, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("reset")))
    (tmp_path / "model.pt").write_bytes(b"weights")
    with tracking.stage_run("stage", nested=False) as run:
        tracking.log_artifact(tmp_path / "model.pt", "checkpoint")
        tracking.log_epoch_metrics({"train/loss": 0.5}, 1)  # the job goes on after the failure
    warning = capsys.readouterr().err
    assert f"MLflow upload failed: artifact {tmp_path / 'model.pt'} -> run {run.info.run_id}" in warning
    assert "after 3 attempts: ConnectionError: reset" in warning
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {"train/loss": 0.5}
    with pytest.raises(TrackingError, match=f"1 MLflow upload\\(s\\) failed; the files are still on disk: artifact "
                                            f"{tmp_path / 'model.pt'}"):
        tracking.raise_failed_uploads()
    tracking.raise_failed_uploads()  # reported once


def _tiny_profile(tmp_path: Path) -> Path:
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile["stages"]["registration"] = {"max_epochs": 1, "epoch_length": 2, "validation_pairs": 1}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile))
    return path


@pytest.mark.slow
def test_deepsim_run_with_failing_uploads_finishes_prints_its_table_and_exits_1_naming_them(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.setattr(mlflow, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    out = tmp_path / "out"
    assert main(["run", "--profile", str(_tiny_profile(tmp_path)), "--losses", "mse", "--no-progress",
                 "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| mse |" in captured.out and (out / "models" / "registration_mse.pt").is_file()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("deepsim: error: TrackingError: ") and "upload(s) failed" in last
    assert f"artifact {out / 'models' / 'registration_mse.pt'} -> run " in last


@pytest.mark.slow
def test_deepsim_run_falls_back_to_a_local_store_and_its_runs_sync_to_the_server_later(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--profile", str(_tiny_profile(tmp_path)), "--losses", "mse", "--no-progress",
                 "--out", str(out), "--tracking-uri", UNREACHABLE, "--tracking-fallback", "local"]) == 0
    local = _store(out / "mlflow.db")
    assert f"logging to {local} instead" in capsys.readouterr().err
    server = _store(tmp_path / "server" / "mlflow.db")  # the server, back up (a second store stands in for it)
    assert main(["sync-runs", "--from", local, "--to", server]) == 0
    assert "4 run(s) copied" in capsys.readouterr().out  # pipeline, preprocess, registration-mse, evaluation
    src, dst = _by_name(local), _by_name(server)
    assert set(src) == set(dst)
    reg = dst["registration-mse"]
    assert reg.data.metrics == src["registration-mse"].data.metrics and "test/dice_mean" in reg.data.metrics
    parent = next(r for name, r in dst.items() if name.startswith("pipeline-"))
    assert reg.data.tags["mlflow.parentRunId"] == parent.info.run_id
    paths = [a.path for a in MlflowClient(server).list_artifacts(reg.info.run_id, "checkpoint")]
    assert paths == ["checkpoint/registration_mse.pt"]


# ------------------------------------------------------------------- issue 21.6: fail fast, one line, clean up
def _read_only(folder: Path, monkeypatch) -> Path:
    """``folder`` made read-only (mode r-x); for root, which may write anyway, os.access reports it as a user sees
    it (a real write by root would succeed, so there is nothing else to simulate)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == folder and mode & os.W_OK
                            else real(p, mode, **k))
    return folder


def test_a_read_only_sqlite_folder_is_one_line_within_seconds(tmp_path, monkeypatch, capsys):
    """Issue 21.6: a read-only sqlite folder failed after 114 s with 36 stderr lines."""
    import time

    store = _read_only(tmp_path / "ro", monkeypatch)
    out = tmp_path / "out"
    started = time.perf_counter()
    assert main(["run", "--profile", "quick", "--tracking-uri", _store(store / "mlflow.db"), "--out", str(out)]) == 1
    assert time.perf_counter() - started < 60  # imports on a loaded machine included; the check is a stat call
    err = capsys.readouterr().err
    assert err == (f"deepsim: error: ConfigError: MLflow tracking URI {_store(store / 'mlflow.db')}: cannot write "
                   f"into {store} (permission denied; SQLite needs to create its journal beside the database)\n")
    assert not out.exists() and list(store.iterdir()) == []


def test_a_mistyped_sqlite_path_is_one_line_and_creates_no_folder(tmp_path, capsys):
    """Issue 21.6: `sqlite:////no/such/dir/mlflow.db` was created silently and the run exited 0."""
    missing = tmp_path / "no" / "such" / "dir"
    assert main(["run", "--profile", "quick", "--tracking-uri", _store(missing / "mlflow.db"),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the folder {missing} does not exist" in err, err
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("server", [UNREACHABLE, "http://192.0.2.1:5000"], ids=["refused", "no route"])
def test_a_model_from_an_unreachable_server_fails_in_seconds_and_leaves_no_temporary_folder(tmp_path, monkeypatch,
                                                                                           capsys, server):
    """Issue 21.6: `--model runs:/<id>` against an unreachable server took 256 s and left a temporary folder.
    192.0.2.1 (TEST-NET-1, RFC 5737) is never routed: a connection there hangs until the probe's timeout."""
    import tempfile
    import time

    import numpy as np
    import nibabel as nib

    image = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), np.eye(4)), str(image))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    started = time.perf_counter()
    assert main(["register", "--fixed", str(image), "--moving", str(image), "--model", "runs:/" + "0" * 32,
                 "--tracking-uri", server, "--out", str(tmp_path / "reg"), "--no-progress"]) == 1
    assert time.perf_counter() - started < 60  # imports on a loaded machine included; it took 256 s
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ConfigError: MLflow tracking URI {server}: not reachable (no connection " \
        f"within {tracking.PROBE_TIMEOUT_S:g} s" in err, err
    assert list(scratch.iterdir()) == [] and not (tmp_path / "reg").exists()


# ------------------------------------------------------------------------------ a kill between log and save
def test_an_epoch_logged_by_a_killed_process_is_not_logged_again_by_the_one_that_resumes(tmp_path, monkeypatch):
    """CI found it (issue 24's run): killed after logging epoch 1's train/loss but before saving the epoch-end
    state, the resumed training repeats epoch 1 and logged it a second time (history steps [1, 1, 2, 3])."""
    tracking.setup_tracking(_store(tmp_path / "mlflow.db"), "exp")
    monkeypatch.setattr(tracking, "_SEEN_KEYS", set())
    with mlflow.start_run() as run:
        tracking.log_epoch_metrics({"train/loss": 0.5}, 1)  # the process that is killed next
    monkeypatch.setattr(tracking, "_SEEN_KEYS", set())  # a new process resumes the same run
    with mlflow.start_run(run_id=run.info.run_id):
        for epoch, loss in [(1, 0.5), (2, 0.4), (3, 0.3)]:
            tracking.log_epoch_metrics({"train/loss": loss, "val/dice": 1 - loss}, epoch)
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val/dice")] == [1, 2, 3]
