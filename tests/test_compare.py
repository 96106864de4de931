"""deepsim compare: HD95 and peak memory against known answers, and the command on the quick profile."""

import numpy as np
import pytest

from deepsim.evaluation.compare import hd95_mm, peak_memory, summarise_comparison


def test_hd95_of_a_cube_shifted_by_k_voxels_is_k_times_the_spacing():
    fixed = np.zeros((30, 30, 30), np.int16)
    fixed[8:18, 8:18, 8:18] = 5
    moved = np.roll(fixed, 3, axis=1)
    assert hd95_mm(fixed, moved, spacing_mm=2.0) == pytest.approx(6.0)
    assert hd95_mm(fixed, fixed, spacing_mm=2.0) == 0.0
    # a label missing from the warped map is skipped (Dice already counts it as 0), not an infinite distance
    other = fixed.copy()
    other[20:25, 20:25, 20:25] = 7
    assert hd95_mm(other, fixed, spacing_mm=1.0) == 0.0


def test_hd95_cropping_per_label_equals_monai_on_the_whole_volume():
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    a = np.zeros((24, 26, 20), np.int16)
    b = np.zeros_like(a)
    a[5:15, 6:18, 4:12] = 1
    b[7:16, 5:15, 6:14] = 1
    b[rng.random(a.shape) < 0.01] = 1  # scattered outliers make the 95th percentile non-trivial
    whole = compute_hausdorff_distance(torch.as_tensor(b)[None, None].float(), torch.as_tensor(a)[None, None].float(),
                                       percentile=95, spacing=1.5)
    assert hd95_mm(a, b, spacing_mm=1.5) == pytest.approx(float(whole[0, 0]), abs=1e-6)


def test_peak_memory_sees_a_native_allocation():
    _, seconds, peak = peak_memory(lambda: np.ones(300 * 2**20 // 8).sum())  # 300 MiB of float64, then freed
    if peak != peak:
        pytest.skip("no /proc/self/clear_refs here (not Linux)")
    assert 250 < peak < 600 and seconds >= 0


def test_summary_tests_every_method_against_the_best():
    import pandas as pd

    rows = [{"method": m, "pair_id": i, "dice_mean": d + 0.01 * i, "folding_pct": 0.0, "std_logjac": 0.1,
             "hd95_mm": 3.0, "seconds": 1.0, "peak_mib": 10.0}
            for m, d in (("identity", 0.2), ("a", 0.5), ("b", 0.45)) for i in range(6)]
    summary = summarise_comparison(pd.DataFrame(rows))
    assert summary.attrs["best"] == "a" and np.isnan(summary.loc["a", "p_vs_best"])
    assert summary.loc["b", "p_vs_best"] < 0.05 and summary.loc["identity", "n_pairs"] == 6


@pytest.mark.slow
def test_compare_command_on_the_quick_profile(tmp_path):
    """The real command on a quick `deepsim run` output: identity and the trained model, MLflow runs, report."""
    import mlflow

    from deepsim.cli import main

    run = tmp_path / "run"
    assert main(["run", "--profile", "quick", "--losses", "mse", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "cmp"
    table = tmp_path / "results" / "compare_toy_cpu.md"
    assert main(["compare", "--from", str(run), "--methods", "identity", "affine", "mse", "mse+io", "--out", str(out),
                 "--table", str(table), "--no-progress"]) == 0
    text = table.read_text()
    assert all(f"| {m} |" in text for m in ("identity", "affine", "mse", "mse+io"))
    assert f"Command: `deepsim compare --from {run} --methods identity affine mse mse+io" in text
    results = __import__("pandas").read_csv(out / "results.csv").groupby("method")["dice_mean"].mean()
    assert results["mse+io"] > results["affine"] > results["identity"]  # each stage adds overlap on the toy pairs
    assert (out / "compare.png").is_file() and table.with_suffix(".png").is_file()
    runs = mlflow.search_runs(experiment_names=["compare"], search_all_experiments=False)
    names = set(runs["tags.mlflow.runName"])
    assert {"identity", "affine", "mse", "mse+io"} <= names and any(n.startswith("compare-") for n in names)
    assert main(["compare", "--from", str(run), "--methods", "voxelmorph", "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 1


def test_missing_classical_tool_or_unknown_method_is_refused_before_any_output(tmp_path, monkeypatch):
    import importlib.util

    from deepsim.errors import ConfigError, DatasetError
    from deepsim.evaluation.compare import check_methods

    with pytest.raises(DatasetError, match="deepsim run"):
        check_methods(tmp_path, None)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "datalist.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown method"):
        check_methods(tmp_path, ["voxelmorph"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ants" else real(name, *a))
    with pytest.raises(ConfigError, match="ants-syn needs antspyx"):
        check_methods(tmp_path, ["identity", "ants-syn"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fireants" else real(name, *a))
    with pytest.raises(ConfigError, match="fireants needs fireants"):
        check_methods(tmp_path, ["fireants"])
    assert check_methods(tmp_path, ["identity"]) == ["identity"]
    # our stages need no trained model for affine and affine+io; a named network must exist
    ours = ["affine", "affine+io", "affine+io-mind"]
    assert check_methods(tmp_path, ours) == ours
    with pytest.raises(ConfigError, match="unknown method"):
        check_methods(tmp_path, ["ncc+io"])
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]
