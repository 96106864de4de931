"""Per-pair metrics, their summary per method, the Markdown results table and paired tests (DESIGN §4).

A results table is long: one row per (method, test pair) with the columns

    method, pair_id, dice_mean, folding_pct, std_logjac[, train_time_s]

:func:`pair_metrics` produces the metric columns of one row; :func:`summarise` reduces the table to one row per
method (Dice mean ± std over pairs, mean folding %, mean std log|J|, training time, number of pairs);
:func:`format_table` renders that summary for a report; :func:`paired_wilcoxon` compares two methods pair by pair.
"""

from __future__ import annotations

import math
import numpy as np
import pandas as pd
import torch
from scipy import stats

from deepsim.evaluation.dice import dice_per_label, mean_dice
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian

__all__ = [
    "IDENTITY_METHOD",
    "SCALAR_METRICS",
    "pair_metrics",
    "summarise",
    "format_table",
    "format_number",
    "paired_wilcoxon",
]

# Name of the no-registration baseline (u = 0): listed first, and it has no training time.
IDENTITY_METHOD = "identity"
#: the suffix of a hybrid row (affine, network, instance optimisation); registration.pipeline.HYBRID's spelling
HYBRID = "+io"
# The per-pair numbers a results row carries (pair_metrics returns the per-label Dice dict beside them).
SCALAR_METRICS = ("dice_mean", "folding_pct", "std_logjac")


def pair_metrics(
    fixed_label: np.ndarray | torch.Tensor,
    warped_label: np.ndarray | torch.Tensor,
    ddf: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[int, float]]:
    """All metrics of ONE registered pair: the scalar row values and, separately, the per-label Dice.

    Args:
        fixed_label: fixed label map, ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)``.
        warped_label: moving label map warped (nearest neighbour) onto the fixed grid, same spatial shape.
        ddf: displacement field in voxels, ``(1, ndim, *spatial)`` or ``(ndim, *spatial)``.
        mask: optional region for the Jacobian statistics (e.g. the fixed brain mask), spatial shape as above.
            Dice is always over the labels present in ``fixed_label``.

    Returns:
        ``(metrics, per_label)``: ``metrics = {"dice_mean", "folding_pct", "std_logjac"}`` (:data:`SCALAR_METRICS`,
        ready to spread into a results row) and ``per_label = {label: dice}`` for the per-label table.
    """
    u = torch.as_tensor(ddf)
    if u.ndim in (3, 4) and u.shape[0] == u.ndim - 1:  # (ndim, *spatial): add the batch axis
        u = u.unsqueeze(0)
    if u.ndim not in (4, 5) or u.shape[0] != 1:
        raise ValueError(f"ddf has shape {tuple(u.shape)}; expected one pair, (1, ndim, *spatial) or (ndim, *spatial)")
    if mask is not None:
        m = torch.as_tensor(mask)
        while m.ndim > u.ndim - 2 and m.shape[0] == 1:  # drop batch/channel axes of size 1
            m = m[0]
        if tuple(m.shape) != tuple(u.shape[2:]):
            raise ValueError(
                f"mask has shape {tuple(torch.as_tensor(mask).shape)}; expected the spatial shape of ddf "
                f"{tuple(u.shape[2:])} (optionally with leading axes of size 1)"
            )
        mask = m.unsqueeze(0)
    per_label = dice_per_label(fixed_label, warped_label)
    det = jacobian_determinant(u)
    metrics = {
        "dice_mean": mean_dice(per_label),
        "folding_pct": folding_percent(det, mask),
        "std_logjac": std_log_jacobian(det, mask),
    }
    return metrics, per_label


def _method_order(methods: pd.Series) -> list[str]:
    """Methods in order of first appearance, the identity baseline first."""
    order = list(dict.fromkeys(methods.tolist()))
    return sorted(order, key=lambda m: 0 if str(m).lower() == IDENTITY_METHOD else 1)  # sort is stable


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method from a long per-pair results table.

    Output columns: ``method, dice_mean, dice_std, folding_pct, std_logjac, train_time_s, n_pairs`` where
    ``dice_std`` is the sample standard deviation (ddof 1) of the per-pair mean Dice over pairs (NaN for one pair),
    ``folding_pct``, ``std_logjac`` and ``train_time_s`` are means over the method's rows (``train_time_s`` NaN when
    the column is absent), and ``n_pairs`` counts distinct ``pair_id``. Rows: identity first, then the order in
    which methods first appear.
    """
    required = ["method", "pair_id", *SCALAR_METRICS]
    missing = [c for c in required if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks column(s) {missing}; it has {list(results.columns)}")
    table = results.copy()
    if "train_time_s" not in table.columns:
        table["train_time_s"] = np.nan
    grouped = table.groupby("method", sort=False)
    summary = pd.DataFrame(
        {
            "dice_mean": grouped["dice_mean"].mean(),
            "dice_std": grouped["dice_mean"].std(ddof=1),
            "folding_pct": grouped["folding_pct"].mean(),
            "std_logjac": grouped["std_logjac"].mean(),
            "train_time_s": grouped["train_time_s"].mean(),
            "n_pairs": grouped["pair_id"].nunique(),
        }
    )
    summary = summary.loc[_method_order(table["method"])]
    summary.index.name = "method"
    return summary.reset_index()


def format_number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals for a Markdown table; "—" for None or NaN."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _baselines(method: str, methods: list[str]) -> list[str]:
    """The rows that ``method`` adds its own stage to: ``affine`` for a network after the affine
    (``affine+<loss>``); ``affine`` and the hybrid's network start (``affine+<loss>``, else ``<loss>`` alone) for
    a hybrid ``<loss>+io``."""
    if method.endswith(HYBRID):
        network = method[: -len(HYBRID)]
        if network == "affine":
            return ["affine"]
        return ["affine", f"affine+{network}" if f"affine+{network}" in methods else network]
    if method.startswith("affine+") and HYBRID not in method:
        return ["affine"]
    return []


def stage_comparisons(results: pd.DataFrame) -> list[str]:
    """One line per (row, baseline) where a row adds a stage to a baseline in ``results``: each network after the
    affine (``affine+<loss>``) against ``affine``; each hybrid ``<loss>+io`` against ``affine`` and against its
    network start (``affine+<loss>``, or ``<loss>`` alone when the table has no such row). Over their common pairs:
    mean Dice difference, pairs improved, two-sided Wilcoxon p."""
    methods = list(dict.fromkeys(results["method"]))
    lines = []
    for method in methods:
        for baseline in _baselines(method, methods):
            if baseline not in methods or baseline == method:
                continue
            a = results.loc[results["method"] == method].set_index("pair_id")["dice_mean"]
            b = results.loc[results["method"] == baseline].set_index("pair_id")["dice_mean"]
            a, b = a.align(b, join="inner")
            p = paired_wilcoxon(results, method, baseline)
            gain, better = float((a - b).mean()), int((a > b).sum())
            lines.append(f"{method} vs {baseline}: Dice {gain:+.3f}, better on {better} of {len(a)} pairs, "
                         f"Wilcoxon p = {p:.2g}")
    return lines


def format_table(summary: pd.DataFrame) -> str:
    """Markdown table of a :func:`summarise` result.

    Columns ``method | Dice mean ± std | folding % | std log|J| | train time``: Dice and std log|J| to 3 decimals,
    folding % to 3 decimals, training time in seconds to 1 decimal; "—" for a missing value and for the identity
    row's training time. The pipes of "log|J|" are escaped (``\\|``) so Markdown keeps five columns.
    """
    lines = [
        "| method | Dice mean ± std | folding % | std log\\|J\\| | train time |",
        "|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        method = str(row.method)
        dice = format_number(row.dice_mean, 3)
        if dice != "—":
            dice += " ± " + format_number(row.dice_std, 3)
        time = getattr(row, "train_time_s", float("nan"))
        time_text = "—" if method.lower() == IDENTITY_METHOD else format_number(time, 1)
        if time_text != "—":
            time_text += " s"
        cells = [method.replace("|", "\\|"), dice, format_number(row.folding_pct, 3),
                 format_number(row.std_logjac, 3), time_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_wilcoxon(results: pd.DataFrame, method: str, baseline: str, metric: str = "dice_mean") -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``method`` vs ``baseline`` over their common ``pair_id``.

    Pairs where either value is NaN are dropped. Returns NaN with fewer than two common pairs or when every
    difference is zero (the test is undefined). Raises ``ValueError`` if a method lists a pair twice.
    """
    columns = {}
    for name in (method, baseline):
        rows = results.loc[results["method"] == name, ["pair_id", metric]]
        if rows.empty:
            raise ValueError(f"method {name!r} has no rows in the results table; methods: "
                             f"{sorted(results['method'].unique().tolist())}")
        if rows["pair_id"].duplicated().any():
            dup = rows.loc[rows["pair_id"].duplicated(), "pair_id"].tolist()
            raise ValueError(f"method {name!r} lists pair_id(s) {dup} more than once; expected one row per pair")
        columns[name] = rows.set_index("pair_id")[metric]
    paired = pd.concat(columns, axis=1, join="inner").dropna()
    if len(paired) < 2:
        return float("nan")
    diff = paired[method].to_numpy(float) - paired[baseline].to_numpy(float)
    if np.all(diff == 0):
        return float("nan")
    return float(stats.wilcoxon(paired[method], paired[baseline], alternative="two-sided").pvalue)
