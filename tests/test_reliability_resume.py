"""Reliability: interrupted training resumes exactly; outputs are written atomically.

Unit level: a small trainer (dropout, a shuffling loader whose passes straddle epochs, contrast randomisation,
gradient steps with Adam) interrupted after its last training-state save and resumed into freshly built objects
ends with bit-identical weights and epoch metrics. End to end (slow): ``deepsim run`` killed with SIGKILL
mid-epoch, then ``deepsim run --resume``, against an uninterrupted run of the same seed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from deepsim.data.intensity import ContrastRandomization
from deepsim.engine import resume as resume_module
from deepsim.engine.checkpoints import load_checkpoint
from deepsim.engine.resume import TrainingState, load_state, state_path
from deepsim.engine.trainer import EpochAverages, SaveNetwork, build_trainer, seed_everything
from deepsim.errors import CheckpointError, ConfigError
from deepsim.io import atomic_write

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a small trainer
class Images(Dataset):
    """Five fixed random 8^3 images."""

    def __init__(self):
        self.x = torch.rand(5, 1, 8, 8, 8, generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


class TrainTime(SaveNetwork):
    """SaveNetwork's clock (part of the training state) without its file: the test net has no registered builder."""

    def __call__(self, engine):
        pass


class Denoise:
    """Task: reconstruct the clean image from a contrast-randomised one (dropout in the net draws from torch)."""

    def __init__(self, transform):
        self.input_transform = transform

    def __call__(self, network, batch, device):
        x = batch["image"].to(device)
        return {"loss": F.mse_loss(network(self.input_transform(x)), x)}


def _train(tmp_path: Path, shuffle: bool, resume: bool = False, crash_at: int | None = None, seed: int = 0,
           stateful: bool = True):
    """Build everything from scratch (``seed`` sets the initial weights) and train 3 epochs of 4 iterations.

    Returns (final weights, epoch metrics logged, iterations this call computed)."""
    seed_everything(seed)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Dropout(0.3),
                                  torch.nn.Conv3d(4, 1, 3, padding=1))
    seed_everything(0)  # the data order and the random streams are the run's, whatever the initial weights
    transform = ContrastRandomization(generator_seed=0)
    logged = []
    averages = EpochAverages(log_fn=lambda metrics, epoch: logged.append((epoch, metrics["train/loss"])))
    save = TrainTime(tmp_path / "net.pt", "feature_net", {})
    state = TrainingState(tmp_path / "net.pt", every=3, resume=resume,
                          stateful={"train_averages": averages, "save_network": save, "input_transform": transform}
                          if stateful else None, fingerprint={"seed": 0})
    loader = DataLoader(Images(), batch_size=2, shuffle=shuffle)  # 3 batches a pass: passes straddle epochs
    trainer = build_trainer(network, Denoise(transform), loader, max_epochs=3, epoch_length=4, learning_rate=0.01,
                            handlers=[averages, save, state])
    computed = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: computed.append(e.state.iteration))
    if crash_at is not None:
        def crash(engine):
            if engine.state.iteration == crash_at:
                raise KeyboardInterrupt("simulated kill")
        trainer.add_event_handler(Events.ITERATION_STARTED, crash)
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    else:
        trainer.run()
    weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return weights, logged, computed


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled-loader", "sequential-loader"])
def test_a_run_interrupted_mid_epoch_resumes_to_bit_identical_weights_and_metrics(tmp_path, shuffle):
    reference, logged_ref, _ = _train(tmp_path / "a", shuffle)
    _, logged_before, _ = _train(tmp_path / "b", shuffle, crash_at=8)  # saved at 3, 4 (epoch end) and 6
    saved = load_state(state_path(tmp_path / "b" / "net.pt"))
    assert saved["iteration"] == 6 and not saved["complete"]
    resumed, logged_after, computed = _train(tmp_path / "b", shuffle, resume=True, seed=123)  # other init weights
    assert computed == list(range(7, 13))  # iterations 7..12 only: nothing repeated, nothing skipped
    assert _same(reference, resumed)
    assert logged_before + logged_after == logged_ref  # epoch 2's average includes iterations 5-6 of the first run
    final = load_state(state_path(tmp_path / "b" / "net.pt"))
    assert final["complete"] and final["iteration"] == 12


def test_the_resume_test_detects_a_resume_that_does_not_restore_the_data_order_and_random_streams(tmp_path,
                                                                                                   monkeypatch):
    """Negative control: with the loader replay and the stateful objects switched off, weights differ."""
    reference, _, _ = _train(tmp_path / "a", True)
    _train(tmp_path / "b", True, crash_at=8, stateful=False)
    monkeypatch.setattr(resume_module.ResumableLoader, "resume_from", lambda self, record, rng: None)
    resumed, _, _ = _train(tmp_path / "b", True, resume=True, stateful=False)
    assert not _same(reference, resumed)


def test_a_finished_state_ends_training_at_once_with_the_saved_weights(tmp_path):
    reference, _, _ = _train(tmp_path, False)
    again, _, computed = _train(tmp_path, False, resume=True, seed=99)
    assert computed == [] and _same(reference, again)


def test_a_fresh_run_removes_a_stale_state_so_a_later_resume_never_mixes_runs(tmp_path):
    _train(tmp_path, False, crash_at=8)
    assert state_path(tmp_path / "net.pt").is_file()
    _train(tmp_path, False, crash_at=2)  # fresh run killed before its first save
    assert not state_path(tmp_path / "net.pt").exists()


def test_resume_without_a_state_file_starts_from_the_beginning(tmp_path):
    reference, _, _ = _train(tmp_path / "a", True)
    resumed, _, computed = _train(tmp_path / "b", True, resume=True)
    assert computed == list(range(1, 13)) and _same(reference, resumed)


def test_a_truncated_or_foreign_state_file_is_a_one_line_checkpoint_error(tmp_path):
    _train(tmp_path, False, crash_at=8)
    path = state_path(tmp_path / "net.pt")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable training state") as err:
        _train(tmp_path, False, resume=True)
    assert "\n" not in str(err.value)
    torch.save({"format": 1, "payload": Images()}, path)  # an object weights_only refuses to unpickle
    with pytest.raises(CheckpointError, match="not a readable training state \\(it holds pickled Python objects"):
        load_state(path)


def test_a_state_of_another_architecture_or_other_settings_is_refused_naming_the_difference(tmp_path):
    _train(tmp_path, False, crash_at=8)
    path = state_path(tmp_path / "net.pt")
    payload = load_state(path)
    payload["network"]["0.weight"] = torch.zeros(8, 1, 3, 3, 3)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"does not match this stage's network \(1 of another shape \(first "
                                              r"0.weight: \(8, 1, 3, 3, 3\) in the file, \(4, 1, 3, 3, 3\)"):
        _train(tmp_path, False, resume=True)
    _train(tmp_path, False, crash_at=8)
    payload = load_state(path)
    payload["fingerprint"]["seed"], payload["epoch_length"] = 7, 5
    torch.save(payload, path)
    with pytest.raises(ConfigError, match=r"saved by a run with other settings: epoch_length 5 \(now 4\), seed 7 "
                                          r"\(now 0\)"):
        _train(tmp_path, False, resume=True)


def test_the_state_file_loads_with_weights_only_and_holds_every_random_stream(tmp_path):
    _train(tmp_path, True, crash_at=8)
    payload = torch.load(state_path(tmp_path / "net.pt"), weights_only=True)
    assert set(payload["rng"]) >= {"python", "numpy", "torch"}
    assert set(payload["stateful"]) == {"train_averages", "save_network", "input_transform"}
    assert payload["stateful"]["input_transform"]["cpu"].dtype == torch.uint8
    # iteration 6 = the last batch of the second pass over 5 images in batches of 2; epoch 2 so far: 5 and 6
    assert payload["loader"]["drawn"] == 3 and payload["stateful"]["train_averages"]["count"] == 2


def test_the_resume_flag_reads_the_strings_the_monai_bundle_command_line_passes(tmp_path):
    assert TrainingState(tmp_path / "x.pt", resume="false").resume is False  # fire passes --resume false as "false"
    assert TrainingState(tmp_path / "x.pt", resume="True").resume is True
    with pytest.raises(ConfigError, match="resume must be true or false, got 'no'"):
        TrainingState(tmp_path / "x.pt", resume="no")


@pytest.mark.parametrize("stage, pairs", [("registration", "fixed"), ("feature_seg", "fixed"),
                                          ("registration", "synthetic"), ("feature_seg", "synthetic")])
def test_a_bundle_stage_resumes_exactly_through_its_config_wiring(tmp_path, monkeypatch, stage, pairs):
    """The bundle's TrainingState gets the stage's own epoch averages, clock and contrast randomisation (config
    references): a stage crashed mid-epoch and run again with ``resume: true`` ends as an uninterrupted one, with
    the prepared pairs and with the synthetic stream (which continues at its next batch: ``skip``)."""
    from deepsim.engine import trainer
    from deepsim.workflow import load_profile, run_stage

    common = {**load_profile("quick").common, "output_dir": str(tmp_path), "progress": False, "checkpoint_every": 3,
              "intensity_augmentation": True, "pairs": pairs}
    run_stage("preprocess", common)
    overrides = {**common, "max_epochs": 3, "epoch_length": 5, "similarity": "mse", "validation_pairs": 1}
    name = "registration_mse" if stage == "registration" else "feature_seg"
    run_stage(stage, overrides)
    reference = load_checkpoint(tmp_path / "models" / f"{name}.pt")
    original = trainer.TaskIteration.__call__

    def crash_at_9(self, engine, batch):
        if engine.state.iteration == 9:
            raise KeyboardInterrupt("simulated kill")
        return original(self, engine, batch)

    monkeypatch.setattr(trainer.TaskIteration, "__call__", crash_at_9)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, overrides)
    assert load_state(tmp_path / "models" / f"{name}.state.pt")["iteration"] == 6
    monkeypatch.setattr(trainer.TaskIteration, "__call__", original)
    run_stage(stage, {**overrides, "resume": True})
    resumed = load_checkpoint(tmp_path / "models" / f"{name}.pt")
    assert all(torch.equal(reference["state_dict"][k], resumed["state_dict"][k]) for k in reference["state_dict"])
    metrics = [k for k in reference["meta"] if k.startswith(("train/", "val/")) and "seconds" not in k]
    assert metrics and all(reference["meta"][k] == resumed["meta"][k] for k in metrics)


def test_resume_refuses_another_profile_seed_or_losses_and_an_output_folder_without_a_run(tmp_path, capsys):
    from deepsim.cli import main
    from deepsim.run_record import RunRecord, run_settings
    from deepsim.workflow import load_profile

    out = tmp_path / "out"
    assert main(["run", "--profile", "quick", "--resume", "--out", str(out)]) == 1
    assert f"ConfigError: --resume: {out / 'run_record.json'} not found" in capsys.readouterr().err
    assert not out.exists()
    settings = run_settings(load_profile("quick"), 0, ["mse"])
    RunRecord.start(out, settings, f"sqlite:///{out / 'mlflow.db'}", "quick")
    assert main(["run", "--profile", "quick", "--losses", "mse", "ncc", "--seed", "1", "--resume", "--out",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: {out} was started with other settings (losses ['mse'], now ['mse', " \
        "'ncc']; seed 0, now 1)" in err
    assert os.listdir(out) == ["run_record.json"]  # refused before MLflow or any stage


# --------------------------------------------------------------------------------------------- atomic writes
def test_an_interrupted_write_leaves_the_previous_file_intact_and_no_temporary_file(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("method,dice\nmse,0.5\n")

    def half_then_die(tmp):
        Path(tmp).write_text("method,di")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_die)
    assert target.read_text() == "method,dice\nmse,0.5\n" and os.listdir(tmp_path) == ["results.csv"]


def test_report_figures_are_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from deepsim.evaluation import figures

    def truncated_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n")  # a few bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", truncated_savefig)
    with pytest.raises(KeyboardInterrupt):
        figures.plot_jacobian(np.ones((8, 8, 8), np.float32), tmp_path / "jacobian.png")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ end to end
def _profile(tmp_path: Path) -> Path:
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile["common"]["checkpoint_every"] = 3
    profile["stages"]["registration"] = {"max_epochs": 3, "epoch_length": 10, "validation_pairs": 1}
    path = tmp_path / "resume_profile.json"
    path.write_text(json.dumps(profile))
    return path


def _runs(out: Path) -> dict:
    """{run name: (status, {metric: [(step, value)]})} of the MLflow store in ``out``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quick").experiment_id])
    result = {}
    for run in runs:
        name = "pipeline" if run.info.run_name.startswith("pipeline-") else run.info.run_name
        # every logged value, in order: a stage retrained from scratch would log its first epochs twice
        history = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                          key=lambda m: (m.timestamp, m.step))]
                   for k in run.data.metrics  # times and system/* samples describe the machine, not the run
                   if "seconds" not in k and "wall_time" not in k and not k.startswith("system/")}
        result[name] = (run.info.status, history, run.info.run_id)
    return result


@pytest.mark.slow
def test_deepsim_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(tmp_path, capsys, caplog):
    """SIGKILL during registration training, then --resume: same MLflow runs continued from the last state (no
    epoch logged twice), nothing truncated left behind, weights and every logged metric equal to an uninterrupted
    run's (tolerance 1e-6; CPU, deterministic)."""
    import logging

    from deepsim.cli import main

    profile = _profile(tmp_path)
    args = ["run", "--profile", str(profile), "--losses", "mse", "--no-progress", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    killed = tmp_path / "killed"
    state = killed / "models" / "registration_mse.state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "deepsim.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = None
    while proc.poll() is None and at is None:
        try:
            saved = torch.load(state, weights_only=True)
            if saved["iteration"] >= 9 and saved["iteration"] % 10 and not saved["complete"]:
                os.kill(proc.pid, signal.SIGKILL)
                at = saved["iteration"]
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL and at is not None, "the run ended before a mid-epoch state was seen"
    # nothing that looks valid is truncated: every visible file parses; a temporary file would be hidden (.name.*)
    for path in killed.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            if path.name.endswith(".state.pt"):
                load_state(path)
            elif path.suffix == ".pt":
                load_checkpoint(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
    record = json.loads((killed / "run_record.json").read_text())
    assert record["stages"]["registration-mse"]["done"] is False
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="deepsim.engine.resume"):
        assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert "preprocess: finished before, skipped" in capsys.readouterr().err  # a log message: stderr
    resumed_at = [r.args[1] for r in caplog.records if r.msg.startswith("resumed")]
    assert len(resumed_at) == 1 and resumed_at[0] >= at and resumed_at[0] % 10  # continued mid-epoch, not restarted
    ref, res = _runs(tmp_path / "reference"), _runs(killed)
    assert sorted(ref) == sorted(res) and all(status == "FINISHED" for status, _, _ in res.values())
    assert res["registration-mse"][2] == record["stages"]["registration-mse"]["run_id"]  # the same run continued
    for name, (_, history, _) in ref.items():
        assert history.keys() == res[name][1].keys(), name
        for key, values in history.items():
            steps, resumed = [s for s, _ in values], res[name][1][key]
            assert steps == [s for s, _ in resumed], (name, key)
            np.testing.assert_allclose([v for _, v in resumed], [v for _, v in values], rtol=0, atol=1e-6)
    a = load_checkpoint(tmp_path / "reference" / "models" / "registration_mse.pt")["state_dict"]
    b = load_checkpoint(killed / "models" / "registration_mse.pt")["state_dict"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
