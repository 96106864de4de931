"""λ selection as the paper does it: train each loss over a grid of regularisation weights, score on validation pairs.

For every loss and every λ of the grid, the profile's registration stage is trained (same data, same steps, same
seed) and evaluated on the **validation** pairs with the same metric code as the test report. The rule that picks
λ per loss (:func:`choose_lambdas`) is stated once here and printed in the report:

    the λ with the highest mean validation Dice among those whose mean folding is ≤ ``max_folding_pct``
    (1 % by default; the paper's published foldings are 0.12–0.93 %); if no λ qualifies, the λ with the least
    folding. Ties in Dice (within ``dice_tolerance``) go to the larger λ, the smoother field.

Everything is logged to MLflow (one parent run, one nested run per (loss, λ) with ``val/dice_mean``,
``val/folding_pct``, ``val/std_logjac``). Files in ``<out>/sweep/``: ``sweep.csv``, ``sweep.md``, ``chosen.json``,
``sweep_dice_vs_folding.png``. ``update_profile`` writes the chosen values into a profile's ``lambdas`` map.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from deepsim.errors import ConfigError
from deepsim.io import atomic_write
from deepsim.tracking import mlflow_tracking as tracking

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GRID", "run_sweep", "choose_lambdas", "relative_grid", "update_profile", "format_sweep"]

#: Default λ grid: powers of two around our defaults (the authors swept 5–6 powers of two per loss).
DEFAULT_GRID: tuple[float, ...] = (0.0625, 0.25, 1.0, 4.0)


def choose_lambdas(table: pd.DataFrame, max_folding_pct: float = 1.0, dice_tolerance: float = 0.002) -> dict[str, float]:
    """Pick λ per loss from a sweep table with columns ``loss, lam, dice_mean, folding_pct`` (see module rule)."""
    chosen = {}
    for loss, rows in table.groupby("loss", sort=False):
        ok = rows[rows["folding_pct"] <= max_folding_pct]
        if ok.empty:
            chosen[loss] = float(rows.sort_values(["folding_pct", "lam"], ascending=[True, False]).iloc[0]["lam"])
            continue
        best = ok["dice_mean"].max()
        near = ok[ok["dice_mean"] >= best - dice_tolerance]
        chosen[loss] = float(near["lam"].max())
    return chosen


def _lam_tag(lam: float) -> str:
    return f"{lam:g}".replace(".", "p")


def _link_feature_nets(models_dir: Path, target: Path) -> None:
    """Give a per-λ models folder the shared pretrained feature nets (hard link, or copy across devices)."""
    target.mkdir(parents=True, exist_ok=True)
    for src in (f for f in models_dir.glob("feature_*.pt") if not f.name.endswith(".state.pt")):
        dst = target / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())


def run_sweep(
    profile,
    output_dir: str | Path,
    losses: Sequence[str],
    grid: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_GRID,
    seed: int = 0,
    device: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    max_folding_pct: float = 1.0,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Train and validate every (loss, λ); returns ``(table, chosen)`` and writes the files listed above.

    ``grid`` is one list of λ for every loss, or a mapping loss -> its own list (see :func:`relative_grid`).
    """
    from deepsim.workflow import (bundle_dir, check_losses, prepare_and_pretrain, registration_overrides,
                                  stage_common, tracked_stage)

    losses = check_losses(losses)
    grids = {loss: sorted({float(v) for v in (grid[loss] if isinstance(grid, Mapping) else grid)}) for loss in losses}
    for loss, values in grids.items():
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise ConfigError(f"λ grid of {loss} must be non-empty finite values ≥ 0, got {values}")
    output_dir = Path(output_dir).resolve()
    sweep_dir = output_dir / "sweep"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup_tracking(tracking_uri or tracking.default_tracking_uri(output_dir),
                                  f"{profile.experiment}-lambda-sweep")
    bundle = bundle_dir(profile.bundle)
    common = stage_common(profile, output_dir, seed, progress, device)
    tags = {**tracking.source_tags(), "dataset": str(profile.common.get("dataset")), "seed": str(seed),
            "profile": profile.name, "bundle": profile.bundle, "kind": "lambda-sweep"}
    rows = []
    with tracking.stage_run(f"sweep-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags, nested=False) as parent:
        tracking.log_params({"profile": profile.name, "losses": losses, "grid": grids,
                             "max_folding_pct": max_folding_pct, **common})
        prepare_and_pretrain(profile, common, losses, tags, bundle)
        for loss in losses:
            for lam in grids[loss]:
                lam_dir = sweep_dir / loss / f"lam_{_lam_tag(lam)}"
                _link_feature_nets(output_dir / "models", lam_dir / "models")
                logger.info(f"sweep {loss} λ={lam:g}")
                lam_common = {**common, "models_dir": str(lam_dir / "models"), "report_dir": str(lam_dir / "val")}
                overrides = {**registration_overrides(profile, lam_common, loss), "regularization_weight": lam}
                started = time.perf_counter()
                run_tags = {**tags, "similarity": loss, "lambda": f"{lam:g}"}
                run_id, _ = tracked_stage(f"sweep-{loss}-lam{lam:g}", "registration", overrides, run_tags,
                                          bundle=bundle)
                train_s = time.perf_counter() - started
                _, parser = tracked_stage(f"sweep-{loss}-lam{lam:g}-validation", "evaluate",
                                          {**lam_common, "methods": [loss], "split": "validation",
                                           "figures": False}, run_tags, bundle=bundle)
                summary = parser.get_parsed_content("evaluate").iloc[0]
                row = {"loss": loss, "lam": lam, "dice_mean": float(summary["dice_mean"]),
                       "dice_std": float(summary["dice_std"]), "folding_pct": float(summary["folding_pct"]),
                       "std_logjac": float(summary["std_logjac"]), "n_pairs": int(summary["n_pairs"]),
                       "train_s": train_s}
                rows.append(row)
                partial = pd.DataFrame(rows)  # kept up to date, so an interrupted sweep keeps what it measured
                atomic_write(sweep_dir / "sweep.csv", lambda tmp: partial.to_csv(tmp, index=False))
                import mlflow

                mlflow.tracking.MlflowClient().log_batch(run_id, metrics=[
                    mlflow.entities.Metric(f"val/{k}", row[k], int(time.time() * 1000), 0)
                    for k in ("dice_mean", "folding_pct", "std_logjac")])
        table = pd.DataFrame(rows)
        chosen = choose_lambdas(table, max_folding_pct)
        atomic_write(sweep_dir / "sweep.csv", lambda tmp: table.to_csv(tmp, index=False))
        atomic_write(sweep_dir / "chosen.json", lambda tmp: Path(tmp).write_text(json.dumps(chosen, indent=1)))
        text = format_sweep(table, chosen, profile.name, max_folding_pct)
        atomic_write(sweep_dir / "sweep.md", lambda tmp: Path(tmp).write_text(text))
        _plot_sweep(table, chosen, sweep_dir / "sweep_dice_vs_folding.png")
        tracking.log_artifact(sweep_dir, "sweep")
        tracking.log_dict(chosen, "chosen_lambdas.json")
        logger.info(f"sweep parent MLflow run: {parent.info.run_id} ({uri})")
    return table, chosen


def relative_grid(profile, losses: Sequence[str], factors: Sequence[float]) -> dict[str, list[float]]:
    """Per-loss grids ``λ_loss × factor``, ``λ_loss`` from the profile's ``lambdas`` or else the bundle default."""
    from deepsim.resources import bundle_dir

    stage = json.loads((bundle_dir(profile.bundle) / "configs" / "train_registration.json").read_text())
    base = {**stage.get("lambdas", {}), **profile.lambdas}
    missing = [loss for loss in losses if loss not in base]
    if missing:
        raise ConfigError(f"no default λ for {missing} in profile {profile.name!r} or its bundle")
    return {loss: [float(base[loss]) * float(f) for f in factors] for loss in losses}


def format_sweep(table: pd.DataFrame, chosen: Mapping[str, float], profile: str, max_folding_pct: float) -> str:
    lines = [f"# λ sweep, profile `{profile}` (validation pairs)", "",
             f"Rule: highest mean validation Dice among λ with mean folding ≤ {max_folding_pct:g} %; ties within "
             "0.002 Dice go to the larger λ; if no λ qualifies, the least folding.", "",
             "| loss | λ | val Dice mean ± std | folding % | std log\\|J\\| | train s | chosen |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        mark = "**yes**" if math.isclose(chosen.get(r.loss, math.nan), r.lam) else ""
        lines.append(f"| {r.loss} | {r.lam:g} | {r.dice_mean:.3f} ± {r.dice_std:.3f} | {r.folding_pct:.3f} | "
                     f"{r.std_logjac:.3f} | {r.train_s:.0f} | {mark} |")
    return "\n".join(lines) + "\n"


def _plot_sweep(table: pd.DataFrame, chosen: Mapping[str, float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for loss, rows in table.groupby("loss", sort=False):
        rows = rows.sort_values("lam")
        line, = ax.plot(rows["folding_pct"], rows["dice_mean"], marker="o", label=loss)
        for r in rows.itertuples():
            ax.annotate(f"{r.lam:g}", (r.folding_pct, r.dice_mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", fontweight="bold" if math.isclose(chosen[loss], r.lam) else None)
    ax.set_xlabel("folding % (det J ≤ 0), validation")
    ax.set_ylabel("Dice, validation")
    ax.set_title("λ sweep (labels: λ; bold: chosen)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def update_profile(profile_path: str | Path, chosen: Mapping[str, float]) -> None:
    """Write ``chosen`` into the ``lambdas`` map of the profile JSON at ``profile_path`` (other keys untouched)."""
    path = Path(profile_path)
    raw = json.loads(path.read_text())
    raw["lambdas"] = {**raw.get("lambdas", {}), **{k: float(v) for k, v in chosen.items()}}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(raw, indent=4) + "\n"))
