"""The reproduction report: per-dataset tables over seeds, paired tests, the paper's two claims, noise study, plots.

Input is one long table (``all_results.csv``), one row per (dataset, seed, noise_std, method, test pair) with the
columns of :func:`deepsim.evaluation.evaluate.evaluate_methods` plus ``dataset`` and ``seed``.

Statistics (stated in the report too):

- Table values are means over all (seed, pair) rows. "± pairs" is the std over pairs of the seed-averaged per-pair
  Dice; "± seeds" the std over seeds of the pair-averaged Dice (training variability).
- Paired tests: two-sided Wilcoxon signed-rank over test pairs, on values averaged over seeds per pair.
- "Best baseline": the intensity loss (mse, ncc, ncc-sup, nmi, mind present in the run) with the highest mean Dice
  on clean images.
- Claim 1 (Dice): each DeepSim loss against the best baseline on clean images.
- Claim 2 (smoothness under noise): at the highest noise level, each DeepSim loss against every intensity loss on
  std log|J| per pair (lower = smoother) and on folding %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepsim.evaluation.summary import IDENTITY_METHOD, format_number, paired_wilcoxon
from deepsim.io import atomic_write

__all__ = ["INTENSITY_LOSSES", "SEMANTIC_LOSSES", "seed_averaged", "dataset_table", "claims", "noise_table",
           "write_report", "plot_noise_study"]

INTENSITY_LOSSES = ("mse", "ncc", "ncc-sup", "nmi", "mind")
SEMANTIC_LOSSES = ("deepsim-ae", "deepsim-seg")
_METRICS = ("dice_mean", "folding_pct", "std_logjac")


def seed_averaged(results: pd.DataFrame) -> pd.DataFrame:
    """Per (method, pair): metrics averaged over seeds. Columns ``method, pair_id`` + the metrics."""
    return results.groupby(["method", "pair_id"], sort=False)[list(_METRICS)].mean().reset_index()


def _order(methods: Sequence[str]) -> list[str]:
    known = [IDENTITY_METHOD, *INTENSITY_LOSSES, *SEMANTIC_LOSSES]
    return sorted(dict.fromkeys(methods), key=lambda m: known.index(m) if m in known else len(known))


def best_baseline(clean: pd.DataFrame) -> str | None:
    means = clean[clean["method"].isin(INTENSITY_LOSSES)].groupby("method")["dice_mean"].mean()
    return None if means.empty else str(means.idxmax())


def _p(v: float) -> str:
    if v is None or math.isnan(v):
        return "—"
    return f"{v:.2g}" if v >= 0.001 else "<0.001"


def dataset_table(results: pd.DataFrame, published: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Markdown table of one dataset's clean-image results (``noise_std == 0``), with published figures if given."""
    clean = results[results["noise_std"] == 0]
    per_pair = seed_averaged(clean)
    baseline = best_baseline(clean)
    published = published or {}
    pub_dice, pub_fold = published.get("dice", {}), published.get("folding_pct", {})
    header = "| method | Dice mean | ± pairs | ± seeds | folding % | std log\\|J\\| | p vs best baseline |"
    sep = "|---|---|---|---|---|---|---|"
    if pub_dice:
        header += " paper Dice | paper folding % |"
        sep += "---|---|"
    lines = [header, sep]
    for method in _order(clean["method"].unique()):
        rows = clean[clean["method"] == method]
        pp = per_pair[per_pair["method"] == method]
        by_seed = rows.groupby("seed")["dice_mean"].mean()
        if method == baseline:
            p = "(best baseline)"
        elif method == IDENTITY_METHOD or baseline is None:
            p = "—"
        else:
            p = _p(paired_wilcoxon(per_pair, method, baseline))
        seed_std = format_number(by_seed.std(ddof=1)) if len(by_seed) > 1 else "—"
        cells = [method, format_number(rows["dice_mean"].mean()), format_number(pp["dice_mean"].std(ddof=1)),
                 seed_std, format_number(rows["folding_pct"].mean()), format_number(rows["std_logjac"].mean()), p]
        if pub_dice:
            cells += [format_number(pub_dice.get(method, float("nan"))),
                      format_number(pub_fold.get(method, float("nan")), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def noise_table(results: pd.DataFrame) -> str:
    """Markdown: Dice / folding % / std log|J| per method (rows) and noise level (column groups)."""
    levels = sorted(results["noise_std"].unique())
    methods = _order(results["method"].unique())
    head = "| method | " + " | ".join(f"σ={s:g}: Dice / fold % / std log\\|J\\|" for s in levels) + " |"
    lines = [head, "|---|" + "---|" * len(levels)]
    for method in methods:
        cells = [method]
        for s in levels:
            rows = results[(results["method"] == method) & (results["noise_std"] == s)]
            cells.append(" / ".join(format_number(rows[m].mean()) for m in _METRICS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims(results: pd.DataFrame) -> list[str]:
    """Plain statements of the paper's two claims on this dataset, each with its numbers and p-values."""
    out = []
    clean = results[results["noise_std"] == 0]
    per_pair = seed_averaged(clean)
    baseline = best_baseline(clean)
    semantic = [m for m in SEMANTIC_LOSSES if m in set(clean["method"])]
    if baseline and semantic:
        b = clean.loc[clean["method"] == baseline, "dice_mean"].mean()
        for m in semantic:
            d = clean.loc[clean["method"] == m, "dice_mean"].mean()
            p = paired_wilcoxon(per_pair, m, baseline)
            direction = "equal to 3 decimals" if abs(d - b) < 5e-4 else ("higher" if d > b else "lower")
            verdict = direction + (", significant at 0.05" if p < 0.05 else ", not significant")
            out.append(f"Claim 1 (Dice ≥ intensity losses): {m} {d:.3f} vs best baseline {baseline} {b:.3f} "
                       f"(Δ {d - b:+.3f}, Wilcoxon p {_p(p)}): {verdict}.")
    sigma = results["noise_std"].max()
    if sigma > 0 and semantic:
        noisy = seed_averaged(results[results["noise_std"] == sigma])
        intensity = [m for m in INTENSITY_LOSSES if m in set(noisy["method"])]
        for m in semantic:
            parts = []
            for other in intensity:
                a = noisy.loc[noisy["method"] == m, "std_logjac"].mean()
                o = noisy.loc[noisy["method"] == other, "std_logjac"].mean()
                p = paired_wilcoxon(noisy, m, other, metric="std_logjac")
                parts.append(f"{other} {o:.3f} ({'smoother' if a < o else 'rougher'}, p {_p(p)})")
            fold = noisy.loc[noisy["method"] == m, "folding_pct"].mean()
            out.append(f"Claim 2 (smoother under noise, σ={sigma:g}): {m} std log|J| "
                       f"{noisy.loc[noisy['method'] == m, 'std_logjac'].mean():.3f}, folding {fold:.3f} % vs "
                       + "; ".join(parts) + ".")
    return out


def plot_noise_study(results: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Dice, folding % and std log|J| against noise std, one line per method (mean over seeds and pairs; error bars:
    std over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    labels = {"dice_mean": "Dice", "folding_pct": "folding % (det J ≤ 0)", "std_logjac": "std log|J|"}
    for method in _order(results["method"].unique()):
        rows = results[results["method"] == method]
        per_seed = rows.groupby(["noise_std", "seed"])[list(_METRICS)].mean().reset_index()
        stats = per_seed.groupby("noise_std")[list(_METRICS)].agg(["mean", "std"])
        style = "--" if method in SEMANTIC_LOSSES else "-"
        for ax, metric in zip(axes, _METRICS):
            ax.errorbar(stats.index, stats[(metric, "mean")], yerr=stats[(metric, "std")].fillna(0), label=method,
                        linestyle=style, marker="o", markersize=3, capsize=2)
    for ax, metric in zip(axes, _METRICS):
        ax.set_xlabel("noise std (intensity, images in [0, 1])")
        ax.set_ylabel(labels[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def write_report(
    results: pd.DataFrame,
    out_dir: Path,
    command: str,
    published: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    qualitative: Mapping[str, Path] | None = None,
    environment: str = "",
    name: str = "paper",
) -> Path:
    """Write ``<out_dir>/<name>.md`` and its PNGs (box plot and noise plot per dataset); return the Markdown path."""
    from deepsim.evaluation.figures import plot_dice_boxplot

    out_dir.mkdir(parents=True, exist_ok=True)
    published = published or {}
    seeds = sorted(results["seed"].unique())
    lines = ["# DeepSim paper reproduction", "", f"Command: `{command}`", ""]
    if environment:
        lines += [environment, ""]
    lines += [f"Seeds: {', '.join(str(s) for s in seeds)}. Noise levels: "
              f"{', '.join(f'{s:g}' for s in sorted(results['noise_std'].unique()))} (Gaussian, std in the [0, 1] "
              "intensity scale, added to both test images and clamped to [0, 1]; training images are clean).", "",
              "Dice: mean over the labels present in the fixed label map (nearest-neighbour warped labels). Values are "
              "means over all (seed, test pair) rows; ± pairs: std over test pairs of the seed-averaged Dice; ± seeds: "
              "std over seeds of the pair-averaged Dice. p: two-sided Wilcoxon signed-rank over test pairs "
              "(seed-averaged) against the best intensity baseline. Folding: % of voxels with det J ≤ 0; std log|J| "
              "over voxels with det J > 0, whole grid.", ""]
    for dataset in dict.fromkeys(results["dataset"]):
        rows = results[results["dataset"] == dataset]
        n_pairs = rows["pair_id"].nunique()
        lines += [f"## {dataset}", "", f"{n_pairs} held-out test pairs × {rows['seed'].nunique()} seeds.", ""]
        lines += [dataset_table(rows, published.get(dataset)), ""]
        if published.get(dataset):
            lines += [f"Paper figures: {published[dataset].get('source', 'DESIGN.md §1')}.", ""]
        lines += ["### The paper's claims on this dataset", ""]
        lines += [f"- {c}" for c in claims(rows)] + [""]
        box = out_dir / f"{name}_{dataset}_dice_boxplot.png"
        clean = seed_averaged(rows[rows["noise_std"] == 0])
        plot_dice_boxplot(clean, box, methods=_order(clean["method"].unique()))
        lines += [f"![Dice per test pair (seed-averaged)]({box.name})", ""]
        if rows["noise_std"].nunique() > 1:
            noise_png = plot_noise_study(rows, out_dir / f"{name}_{dataset}_noise.png", dataset)
            lines += ["### Noise study", "", noise_table(rows), "", f"![smoothness vs noise]({noise_png.name})", ""]
        if qualitative and dataset in qualitative:
            png = Path(qualitative[dataset]).name
            lines += ["### Qualitative (seed 0, first test pair)", "", f"![qualitative]({png})", ""]
    path = out_dir / f"{name}.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return path


def summary_numbers(results: pd.DataFrame) -> dict[str, float]:
    """Flat ``{dataset/method/metric: value}`` on clean images, for MLflow metrics of the parent run."""
    clean = results[results["noise_std"] == 0]
    out = {}
    for (dataset, method), rows in clean.groupby(["dataset", "method"]):
        for m in _METRICS:
            out[f"{dataset}/{method}/{m}"] = float(np.nanmean(rows[m]))
    return out
