"""λ sweep rule, noise, reproduction report statistics, and the sweep / reproduce commands end to end (quick data)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deepsim.data.noise import add_gaussian_noise
from deepsim.experiments.report import best_baseline, claims, dataset_table, noise_table, seed_averaged, write_report
from deepsim.experiments.sweep import choose_lambdas, update_profile

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- λ rule
def _sweep_table(rows):
    return pd.DataFrame(rows, columns=["loss", "lam", "dice_mean", "folding_pct"])


def test_lambda_rule_takes_best_dice_within_folding_limit():
    table = _sweep_table([("mse", 0.1, 0.40, 2.0), ("mse", 1.0, 0.35, 0.5), ("mse", 4.0, 0.30, 0.0)])
    assert choose_lambdas(table, max_folding_pct=1.0) == {"mse": 1.0}  # 0.1 has the best Dice but folds 2 %
    assert choose_lambdas(table, max_folding_pct=5.0) == {"mse": 0.1}


def test_lambda_rule_ties_go_to_the_smoother_field_and_no_candidate_to_least_folding():
    tie = _sweep_table([("ncc", 0.5, 0.400, 0.0), ("ncc", 2.0, 0.399, 0.0), ("ncc", 8.0, 0.390, 0.0)])
    assert choose_lambdas(tie) == {"ncc": 2.0}
    folding = _sweep_table([("mind", 0.1, 0.4, 5.0), ("mind", 1.0, 0.3, 3.0)])
    assert choose_lambdas(folding) == {"mind": 1.0}


def test_update_profile_writes_only_the_lambdas(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"description": "d", "lambdas": {"mse": 0.05, "ncc": 1.0}}))
    update_profile(path, {"ncc": 0.25, "nmi": 2.0})
    raw = json.loads(path.read_text())
    assert raw == {"description": "d", "lambdas": {"mse": 0.05, "ncc": 0.25, "nmi": 2.0}}


# ---------------------------------------------------------------- noise
def test_noise_is_reproducible_clamped_and_has_the_requested_std():
    image = torch.full((1, 40, 40, 40), 0.5)
    a, b = add_gaussian_noise(image, 0.1, seed=3, key=7), add_gaussian_noise(image, 0.1, seed=3, key=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, add_gaussian_noise(image, 0.1, seed=3, key=8))
    assert float((a - 0.5).std()) == pytest.approx(0.1, rel=0.03)  # 0.5 ± 5σ never clamps at σ = 0.1
    assert float(add_gaussian_noise(image, 2.0, 0).min()) >= 0 and float(add_gaussian_noise(image, 2.0, 0).max()) <= 1
    assert add_gaussian_noise(image, 0.0, 0) is image
    with pytest.raises(ValueError):
        add_gaussian_noise(image, -0.1, 0)


# ---------------------------------------------------------------- report statistics
def _results(seed_effect=0.0):
    """Two seeds, three noise levels, 12 pairs; deepsim-seg better than ncc by 0.02 on every pair; mse worse."""
    rng = np.random.default_rng(0)
    rows = []
    base = rng.uniform(0.3, 0.5, 12)
    for seed in (0, 1):
        for sigma in (0.0, 0.1, 0.2):
            for method, offset, logj in (("identity", -0.1, 0.0), ("mse", -0.01, 0.2), ("ncc", 0.0, 0.25),
                                         ("deepsim-seg", 0.02, 0.1)):
                for i, b in enumerate(base):
                    rows.append({"dataset": "toy", "seed": seed, "noise_std": sigma, "method": method,
                                 "pair_id": f"p{i}", "dice_mean": b + offset + seed * seed_effect - sigma * 0.1,
                                 "folding_pct": 0.0, "std_logjac": logj * (1 + sigma) + 0.001 * i})
    return pd.DataFrame(rows)


def test_best_baseline_and_claims_name_the_right_methods_with_p_values():
    results = _results()
    assert best_baseline(results[results["noise_std"] == 0]) == "ncc"
    text = claims(results)
    assert len(text) == 2
    assert "deepsim-seg" in text[0] and "best baseline ncc" in text[0] and "Δ +0.020" in text[0]
    assert "higher, significant at 0.05" in text[0]  # 12 pairs, all differences positive: p = 2/4096
    assert "σ=0.2" in text[1] and "mse" in text[1] and "smoother" in text[1] and "rougher" not in text[1]


def test_dataset_table_averages_over_seeds_and_shows_published_values():
    results = _results(seed_effect=0.01)
    table = dataset_table(results, {"dice": {"ncc": 0.657}, "folding_pct": {"ncc": 0.93}})
    lines = table.splitlines()
    assert lines[0].startswith("| method | Dice mean |") and "paper Dice" in lines[0]
    ncc = next(line for line in lines if line.startswith("| ncc "))
    clean = results[(results["noise_std"] == 0) & (results["method"] == "ncc")]
    assert f"{clean['dice_mean'].mean():.3f}" in ncc and "(best baseline)" in ncc and "0.657" in ncc
    seed_std = clean.groupby("seed")["dice_mean"].mean().std(ddof=1)
    assert f"{seed_std:.3f}" in ncc  # ± seeds column
    assert len(seed_averaged(clean)) == 12


def test_write_report_writes_markdown_and_plots(tmp_path):
    results = _results()
    path = write_report(results, tmp_path, "deepsim reproduce --test", environment="Machine: test")
    text = path.read_text()
    assert "## toy" in text and "Claim 1" in text and "Claim 2" in text and "deepsim reproduce --test" in text
    assert "σ=0.1" in noise_table(results)
    for png in ("paper_toy_dice_boxplot.png", "paper_toy_noise.png"):
        assert (tmp_path / png).stat().st_size > 1000


# ---------------------------------------------------------------- commands end to end on the quick profile
def _tiny_experiment(tmp_path):
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile["losses"] = ["mse", "deepsim-seg"]
    (tmp_path / "tiny.json").write_text(json.dumps(profile))
    config = {"description": "test", "experiment": "tiny", "seeds": [0, 1], "noise_levels": [0.0, 0.1],
              "datasets": [{"name": "toy", "profile": str(tmp_path / "tiny.json")}]}
    (tmp_path / "experiment.json").write_text(json.dumps(config))
    return tmp_path / "experiment.json"


@pytest.mark.slow
def test_reproduce_command_writes_report_rows_for_every_seed_noise_method_and_pair(tmp_path, capsys):
    from deepsim.cli import main

    out = tmp_path / "out"
    assert main(["reproduce", "--config", str(_tiny_experiment(tmp_path)), "--out", str(out), "--no-progress"]) == 0
    results = pd.read_csv(out / "report" / "all_results.csv")
    n_pairs = results["pair_id"].nunique()
    assert n_pairs >= 2
    assert len(results) == 2 * 2 * 3 * n_pairs  # seeds x noise levels x methods (identity, mse, deepsim-seg) x pairs
    assert set(results["noise_std"]) == {0.0, 0.1}
    report = (out / "report" / "experiment.md").read_text()
    assert "## toy" in report and "Claim" in report
    assert (out / "report" / "experiment_toy_qualitative.png").stat().st_size > 1000
    # a second call finds every seed's results and only rebuilds the report
    assert main(["reproduce", "--config", str(tmp_path / "experiment.json"), "--out", str(out),
                 "--no-progress"]) == 0
    assert "results found, reused" in capsys.readouterr().err
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    parents = runs[runs["tags.mlflow.runName"].str.startswith("reproduce-")]
    assert len(parents) == 2
    pipelines = runs[runs["tags.mlflow.runName"].str.startswith("pipeline-")]
    assert len(pipelines) == 2 and set(pipelines["tags.mlflow.parentRunId"]) <= set(parents["run_id"])
    assert math.isfinite(parents.iloc[-1]["metrics.test/toy/mse/dice_mean"])


@pytest.mark.slow
def test_sweep_command_scores_every_lambda_on_validation_and_updates_the_profile(tmp_path):
    from deepsim.cli import main

    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps(profile))
    out = tmp_path / "sweep"
    assert main(["sweep", "--profile", str(profile_path), "--losses", "mse", "ncc", "--grid", "0.1", "10",
                 "--out", str(out), "--update-profile", str(profile_path), "--no-progress"]) == 0
    table = pd.read_csv(out / "sweep" / "sweep.csv")
    assert len(table) == 4 and set(table["lam"]) == {0.1, 10.0}
    chosen = json.loads((out / "sweep" / "chosen.json").read_text())
    assert chosen == choose_lambdas(table)
    assert json.loads(profile_path.read_text())["lambdas"]["ncc"] == chosen["ncc"]
    assert (out / "sweep" / "sweep_dice_vs_folding.png").stat().st_size > 1000


def test_report_command_merges_results_files_and_names_a_missing_one(tmp_path, capsys):
    from deepsim.cli import main

    results = _results()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    results.to_csv(a, index=False)
    results.assign(dataset="other").to_csv(b, index=False)
    assert main(["report", "--results", str(a), str(b), "--out", str(tmp_path / "r"), "--name", "merged",
                 "--note", "brain: machine A", "--command", "made by hand"]) == 0
    text = (tmp_path / "r" / "merged.md").read_text()
    assert "## toy" in text and "## other" in text and "brain: machine A" in text and "made by hand" in text
    assert main(["report", "--results", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")]) == 1
    assert "nope.csv" in capsys.readouterr().err
