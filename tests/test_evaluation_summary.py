"""Per-pair metrics, per-method summary, the Markdown table and the paired Wilcoxon test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from deepsim.evaluation.summary import format_table, pair_metrics, paired_wilcoxon, summarise


@pytest.mark.parametrize("spatial", [(6, 5), (5, 4, 3)], ids=["2d", "3d"])
def test_pair_metrics_of_identity_registration(spatial):
    labels = torch.arange(int(np.prod(spatial))).reshape(1, 1, *spatial) % 3  # labels 0, 1, 2
    metrics, per_label = pair_metrics(labels, labels, torch.zeros(1, len(spatial), *spatial))
    assert metrics == {"dice_mean": 1.0, "folding_pct": 0.0, "std_logjac": 0.0}
    assert per_label == {1: 1.0, 2: 1.0}


def test_pair_metrics_mask_restricts_jacobian_statistics_only():
    fixed = torch.tensor([[1, 1, 2, 2]] * 4)
    warped = torch.tensor([[1, 2, 2, 2]] * 4)
    ddf = torch.zeros(2, 4, 4)
    # u_0 = −3 clamp(x_0, 0, 2): det J = −2, −2, −0.5 on rows 0–2 (folded), 1 on row 3
    ddf[0] = -3.0 * torch.arange(4.0).clamp(max=2)[:, None]
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 3, :] = 1
    with_mask, _ = pair_metrics(fixed, warped, ddf, mask=mask)
    without, per_label = pair_metrics(fixed, warped, ddf)
    assert per_label == pytest.approx({1: 2 / 3, 2: 4 / 5})
    assert with_mask["folding_pct"] == 0.0
    assert without["folding_pct"] == 75.0
    assert with_mask["dice_mean"] == without["dice_mean"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def _results():
    return pd.DataFrame(
        {
            "method": ["mse"] * 3 + ["identity"] * 3 + ["deepsim"] * 3,
            "pair_id": ["a", "b", "c"] * 3,
            "dice_mean": [0.6, 0.7, 0.8, 0.3, 0.4, 0.5, 0.65, 0.75, 0.8],
            "folding_pct": [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3],
            "std_logjac": [0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1],
            "train_time_s": [100.0] * 3 + [np.nan] * 3 + [250.0] * 3,
        }
    )


def test_summarise_gives_one_row_per_method_identity_first():
    summary = summarise(_results())
    assert summary["method"].tolist() == ["identity", "mse", "deepsim"]
    mse = summary.set_index("method").loc["mse"]
    assert mse["dice_mean"] == pytest.approx(0.7)
    assert mse["dice_std"] == pytest.approx(0.1)  # sample std over pairs
    assert mse["folding_pct"] == pytest.approx(2.0)
    assert mse["std_logjac"] == pytest.approx(0.3)
    assert mse["train_time_s"] == 100.0
    assert mse["n_pairs"] == 3


def test_summarise_without_train_time_column_and_missing_column_error():
    summary = summarise(_results().drop(columns="train_time_s"))
    assert summary["train_time_s"].isna().all()
    with pytest.raises(ValueError, match="folding_pct"):
        summarise(_results().drop(columns="folding_pct"))


def test_format_table_is_a_five_column_markdown_table():
    text = format_table(summarise(_results()))
    lines = text.strip().splitlines()
    assert lines[0] == "| method | Dice mean ± std | folding % | std log\\|J\\| | train time |"
    assert len(lines) == 2 + 3
    # escaped pipes do not split cells: every row has five cells
    assert all(line.replace("\\|", "").count("|") == 6 for line in lines)
    assert lines[2] == "| identity | 0.400 ± 0.100 | 0.000 | 0.000 | — |"
    assert lines[3] == "| mse | 0.700 ± 0.100 | 2.000 | 0.300 | 100.0 s |"


def test_paired_wilcoxon_matches_scipy_over_common_pairs():
    rng = np.random.default_rng(0)
    n = 8
    base = rng.uniform(0.3, 0.5, n)
    better = base + rng.uniform(0.01, 0.1, n)
    results = pd.DataFrame(
        {
            "method": ["identity"] * n + ["mse"] * (n + 1),
            "pair_id": list(range(n)) + list(range(n - 1, -1, -1)) + [99],  # shuffled order, one unpaired row
            "dice_mean": list(base) + list(better[::-1]) + [0.9],
        }
    )
    p = paired_wilcoxon(results, "mse", "identity")
    assert p == pytest.approx(stats.wilcoxon(better, base).pvalue)
    assert p < 0.05


def test_paired_wilcoxon_is_nan_for_fewer_than_two_pairs_or_no_differences():
    one_pair = pd.DataFrame({"method": ["a", "b"], "pair_id": [1, 1], "dice_mean": [0.5, 0.6]})
    assert math.isnan(paired_wilcoxon(one_pair, "a", "b"))
    ties = pd.DataFrame({"method": ["a", "a", "b", "b"], "pair_id": [1, 2, 1, 2], "dice_mean": [0.5, 0.6, 0.5, 0.6]})
    assert math.isnan(paired_wilcoxon(ties, "a", "b"))
    with pytest.raises(ValueError, match="'c' has no rows"):
        paired_wilcoxon(ties, "c", "a")


def test_stage_comparisons_pair_each_hybrid_with_the_affine_and_its_network():
    import pandas as pd

    from deepsim.evaluation.summary import stage_comparisons

    rows = [{"method": m, "pair_id": i, "dice_mean": d + 0.01 * i}
            for m, d in (("affine", 0.35), ("ncc", 0.30), ("ncc+io", 0.50), ("identity", 0.2)) for i in range(6)]
    rows[-7]["dice_mean"] = 0.0  # ncc+io's last pair: worse than both baselines there
    lines = stage_comparisons(pd.DataFrame(rows))
    assert len(lines) == 2 and lines[0].startswith("ncc+io vs affine: Dice +0.")
    assert "better on 5 of 6 pairs" in lines[0] and "ncc+io vs ncc" in lines[1] and "Wilcoxon p = " in lines[1]
    assert stage_comparisons(pd.DataFrame([r for r in rows if r["method"] != "ncc+io"])) == []


def test_stage_comparisons_pair_each_network_after_the_affine_with_the_affine_and_the_hybrid_with_its_start():
    import pandas as pd

    from deepsim.evaluation.summary import stage_comparisons

    rows = [{"method": m, "pair_id": i, "dice_mean": d + 0.01 * i}
            for m, d in (("identity", 0.2), ("affine", 0.35), ("affine+mse", 0.30), ("affine+ncc", 0.42),
                         ("ncc+io", 0.50), ("affine+io", 0.45)) for i in range(6)]
    lines = stage_comparisons(pd.DataFrame(rows))
    assert [line.split(":")[0] for line in lines] == ["affine+mse vs affine", "affine+ncc vs affine",
                                                      "ncc+io vs affine", "ncc+io vs affine+ncc", "affine+io vs affine"]
    assert lines[0].startswith("affine+mse vs affine: Dice -0.050, better on 0 of 6 pairs")
    assert lines[3].startswith("ncc+io vs affine+ncc: Dice +0.080, better on 6 of 6 pairs")
