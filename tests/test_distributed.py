"""Data-parallel training under torchrun: 2 gloo processes on CPU step exactly like one process with the global batch.

The end-to-end tests launch torchrun (``python -m torch.distributed.run``, torchrun's entry point) as a subprocess
with ``--standalone`` and ``OMP_NUM_THREADS=1``, on the quick profile's toy data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from torch import nn

from deepsim.cli import main
from deepsim.engine import distributed
from deepsim.workflow import MULTI_GPU_FILES, STAGE_FILES, bundle_dir, load_profile

REPO = Path(__file__).resolve().parents[1]
CONFIGS = bundle_dir("brain_mri") / "configs"
# Two processes and one process with twice the batch add up the same float32 gradients in another order; after
# four Adam steps the step losses agree to ~1e-7 relative (measured); 1e-5 leaves room for other CPUs' kernels.
LOSS_RTOL = 1e-5
# Quick-profile registration: 2 epochs of 2 steps, 1 validation pair (so rank 1 validates none and still reduces).
QUICK = {**load_profile("quick").common, "progress": False, "similarity": "ncc", "max_epochs": 2,
         "epoch_length": 2, "validation_pairs": 1}
# Test-only config: record every step's local loss and dump this rank's final weights (no package code needed).
RECORD = {
    "imports": ["$import torch", "$import monai", "$import ignite"],
    "step_losses": "$[]",
    "rank": "$torch.distributed.get_rank() if torch.distributed.is_initialized() else 0",
    "run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, "
        "lambda engine: @step_losses.append(engine.state.output[0]['loss']))",
        "$@train#trainer.run()",
        "$torch.save({'losses': @step_losses, 'state': getattr(@train#trainer.network, 'module', "
        "@train#trainer.network).state_dict()}, @output_dir + '/rank' + str(@rank) + '.pt')",
    ],
}


def torchrun(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _overrides(values: dict) -> list[str]:
    """``monai.bundle run`` command-line overrides: ``--key value`` (lists as JSON)."""
    return [arg for key, value in values.items()
            for arg in (f"--{key}", json.dumps(value) if isinstance(value, list) else str(value))]


@pytest.mark.slow
def test_two_gloo_ranks_train_registration_like_one_process_with_the_global_batch(tmp_path):
    record = tmp_path / "record.json"
    record.write_text(json.dumps(RECORD))
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    files = [str(CONFIGS / "common.json"), str(CONFIGS / STAGE_FILES["registration"]),
             str(CONFIGS / MULTI_GPU_FILES["registration"])]
    # the documented command (docs/distributed.md) plus the recording config; rank 0 prepares the toy data itself
    torchrun("-m", "monai.bundle", "run", "--config_file", str([*files, str(record)]),
             *_overrides({**QUICK, "output_dir": str(ddp_out)}), cwd=tmp_path)
    ranks = [torch.load(ddp_out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # one process, batch 2, the same pairs (pair i is a function of (seed, i); rank r reads pairs r, r + 2, ...)
    steps = QUICK["max_epochs"] * QUICK["epoch_length"]
    one = ConfigWorkflow(config_file=[*files[:2], str(record)], meta_file=str(CONFIGS / "metadata.json"),
                         logging_file=False, workflow_type=None,
                         **{**QUICK, "output_dir": str(one_out), "train#dataloader#batch_size": 2,
                            "train#dataloader#num_pairs": 2 * steps})
    one.initialize()
    one.run()
    one.finalize()
    single = torch.load(one_out / "rank0.pt", weights_only=True)

    weight_diff = max((ranks[0]["state"][k] - ranks[1]["state"][k]).abs().max().item() for k in ranks[0]["state"])
    assert weight_diff == 0.0  # DDP: every rank applies the same averaged gradient
    ddp_curve = torch.tensor(ranks[0]["losses"]) / 2 + torch.tensor(ranks[1]["losses"]) / 2
    assert len(ddp_curve) == steps
    curve_diff = ((ddp_curve - torch.tensor(single["losses"])).abs() / torch.tensor(single["losses"]).abs()).max()
    print(f"max weight difference between ranks {weight_diff}; max relative loss difference vs 1 process "
          f"{curve_diff.item():.2e} over {steps} steps")
    torch.testing.assert_close(ddp_curve, torch.tensor(single["losses"]), rtol=LOSS_RTOL, atol=0)
    one_diff = max((ranks[0]["state"][k] - v).abs().max().item() for k, v in single["state"].items())
    print(f"max weight difference DDP vs 1 process {one_diff:.2e}")
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6)

    saved = torch.load(ddp_out / "models" / "registration_ncc.pt", weights_only=True)  # written by rank 0 only
    assert set(saved["state_dict"]) == set(single["state"])  # no DDP "module." prefix
    reference = torch.load(one_out / "models" / "registration_ncc.pt", weights_only=True)["meta"]
    for metric in ("train/loss", "val/dice"):  # epoch averages and validation reduced over the ranks
        assert saved["meta"][metric] == pytest.approx(reference[metric], rel=LOSS_RTOL)


@pytest.mark.slow
def test_two_gloo_ranks_train_on_alternate_batches_of_the_synthetic_stream(tmp_path):
    from deepsim.data.pair_sources import training_bank, training_pairs

    record = tmp_path / "record.json"
    seen = {"seen": "$[]", "run": ["$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED, "
                                   "lambda engine: @seen.append(float(engine.state.batch['fixed'].sum())))",
                                   *RECORD["run"], "$torch.save(@seen, @output_dir + '/seen' + str(@rank) + '.pt')"]}
    record.write_text(json.dumps({**RECORD, **seen}))
    files = [str(CONFIGS / "common.json"), str(CONFIGS / STAGE_FILES["registration"]),
             str(CONFIGS / MULTI_GPU_FILES["registration"]), str(record)]
    out = tmp_path / "ddp"
    torchrun("-m", "monai.bundle", "run", "--config_file", str(files),
             *_overrides({**QUICK, "output_dir": str(out), "pairs": "synthetic"}), cwd=tmp_path)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    seen = [torch.load(out / f"seen{r}.pt", weights_only=True) for r in (0, 1)]
    datalist = out / "data" / "datalist.json"
    stream = training_pairs("synthetic", datalist, training_bank("synthetic", datalist), num_pairs=1, seed=0)
    steps = QUICK["max_epochs"] * QUICK["epoch_length"]
    expected = [float(b["fixed"].sum()) for b, _ in zip(stream, range(2 * steps))]
    assert seen[0] == expected[0::2] and seen[1] == expected[1::2]  # rank r reads batches r, r + 2, ...


@pytest.mark.slow
def test_distributed_cli_trains_every_stage_and_only_rank_0_tracks(tmp_path):
    import mlflow

    result = torchrun("-m", "deepsim.cli", "run", "--distributed", "--profile", "quick", "--losses", "deepsim-seg",
                      "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path)
    assert result.stdout.count("| deepsim-seg |") == 1  # the table, printed by rank 0 only
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert sorted(runs["tags.mlflow.runName"].str.split("-seed").str[0]) == [
        "evaluation", "feature_seg", "pipeline-quick", "preprocess", "registration-deepsim-seg"]
    run_id = runs.loc[runs["tags.mlflow.runName"] == "registration-deepsim-seg", "run_id"].item()
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # one value per epoch, not one per rank


def test_distributed_flag_outside_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--distributed", "--profile", "quick", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torchrun" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_rank_shards_are_the_one_process_batches_of_two(shuffle, monkeypatch):
    data = list(range(10))
    one = list(distributed.PassShuffledSampler(data, shuffle=shuffle, seed=3))
    shards = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(list(distributed.PassShuffledSampler(data, shuffle=shuffle, seed=3)))
    assert [[a, b] for a, b in zip(*shards)] == [one[i:i + 2] for i in range(0, 10, 2)]
    assert sorted(one) == data and (one != data) == shuffle


def test_pass_sampler_draws_a_new_order_every_pass_and_ignores_set_epoch():
    sampler = distributed.PassShuffledSampler(list(range(20)), shuffle=True, seed=0)
    first = list(sampler)
    sampler.set_epoch(0)  # MONAI's trainer calls this at every epoch start
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(20)) and first != second


def test_single_process_helpers_change_nothing():
    net = nn.Linear(2, 2)
    assert distributed.wrap_ddp(net, "cpu") is net and distributed.unwrap(net) is net
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.run_on_main(lambda x, y=0: x + y, 1, y=2) == 3
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)


@pytest.mark.parametrize("bundle", ["brain_mri", "cells_2d"])
@pytest.mark.parametrize("stage", sorted(MULTI_GPU_FILES))
def test_multi_gpu_config_wraps_the_stage_network_and_shards_its_data(bundle, stage):
    configs = bundle_dir(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "common.json"), str(configs / STAGE_FILES[stage]),
                        str(configs / MULTI_GPU_FILES[stage])])
    assert parser["train#trainer#network#_target_"] == "deepsim.engine.distributed.wrap_ddp"
    assert parser["train#dataloader#sampler"] == "@train#sampler"
    assert parser["train#sampler#shuffle"] == (stage != "registration")
    # fixed data: each rank's shard of the pairs; synthetic pairs: each rank's stride of the stream
    assert parser["train#dataloader#world_size"] == "$torch.distributed.get_world_size()"
    assert parser["finalize"] == [{"_target_": "deepsim.engine.distributed.destroy"}]
    sampler = "$getattr(@train#dataloader, 'sampler', None)"
    saving = [h for h in parser["train#handlers"] if h.get("stateful", {}).get("sampler") == sampler]
    assert [h["_target_"] for h in saving] == ["deepsim.engine.resume.TrainingState"]  # resuming replays the pass
    twin = bundle_dir("cells_2d" if bundle == "brain_mri" else "brain_mri") / "configs" / MULTI_GPU_FILES[stage]
    assert json.loads((configs / MULTI_GPU_FILES[stage]).read_text()) == json.loads(twin.read_text())


@pytest.mark.slow
def test_scaling_benchmark_runs_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "bench"
    torchrun(str(REPO / "benchmarks" / "ddp_scaling.py"), "--size", "32", "32", "32", "--losses", "ncc",
             "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--out", str(out), cwd=tmp_path)
    record = json.loads((out / "n2.json").read_text())
    assert record["world_size"] == 2 and record["env"]["backend"] == "gloo"
    ncc = record["results"]["ncc"]
    assert ncc["samples_per_s"] == pytest.approx(2 * ncc["steps_per_s"]) and ncc["allreduce_ms_per_step"] > 0
    assert "| ncc | 2 |" in (out / "ddp_scaling.md").read_text()


def test_pass_sampler_state_replays_the_pass_in_progress():
    sampler = distributed.PassShuffledSampler(list(range(20)), shuffle=True, seed=0)
    list(sampler)
    second = list(sampler)
    state = sampler.state_dict()
    resumed = distributed.PassShuffledSampler(list(range(20)), shuffle=True, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == second
