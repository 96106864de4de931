"""``deepsim cohort ... group``: the study's summaries gathered, its QC report, one MLflow parent run.

Reads what the participant level left in the output folder (each subject's ``<prefix>_registration.json`` and the
failure records), writes ``group_metrics.csv``, ``failures.csv`` and ``group_report.html``
(:mod:`deepsim.evaluation.group_report`), and logs one MLflow parent run for the study (experiment
``deepsim-cohort``): the study's settings as params, mean metrics, a nested run per subject with its metrics, and
the report, metrics and failures as artifacts.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from deepsim.errors import DatasetError
from deepsim.io import atomic_write

__all__ = ["run_group", "METRICS", "EXPERIMENT"]

#: the columns of the metrics table, in order (absent ones, e.g. Dice without labels, are left out)
METRICS = ("similarity_after", "dice", "dice_native", "folding_pct", "std_log_jacobian", "inverse_residual_p99_vox")
EXPERIMENT = "deepsim-cohort"


def _summaries(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(out_dir.glob("sub-*/**/anat/*_registration.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        prefix = path.name.removesuffix("_registration.json")
        rows.append({"id": prefix, "folder": path.parent, **summary})
    return rows


def _overlay(out_dir: Path, row: dict, template: np.ndarray) -> bytes | None:
    from deepsim.evaluation.group_report import overlay_png
    from deepsim.io import read_image

    path = row["folder"] / row["outputs"]["t1w"]
    try:
        image, _, _ = read_image(path)
    except DatasetError:
        return None
    return overlay_png(image, template, row["id"])


def run_group(out_dir: str | Path, tracking_uri: str | None = None, command: str = "") -> dict:
    """Write the group outputs of ``out_dir`` (module docstring); returns ``{"report", "metrics", "failures",
    "rows", "failed", "run_id"}``. DatasetError when the participant level has left nothing there."""
    from deepsim.data.templates import load_template
    from deepsim.evaluation.group_report import render_report
    from deepsim.workflows.cohort import write_failures_csv

    out_dir = Path(out_dir)
    rows = _summaries(out_dir)
    failures_path, failures = write_failures_csv(out_dir) if out_dir.is_dir() else (None, [])
    if not rows and not failures:
        raise DatasetError(f"{out_dir}: no participant-level results (run deepsim cohort ... participant first)")
    settings = rows[0]["settings"] if rows else {}
    metrics = [m for m in METRICS if any(row["metrics"].get(m) is not None for row in rows)]
    table = [{"id": row["id"], **{m: row["metrics"].get(m) for m in metrics}} for row in rows]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", *metrics])
    writer.writeheader()
    writer.writerows(table)
    metrics_path = atomic_write(out_dir / "group_metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))

    figures = {}
    if rows:
        template = _template_image(settings, load_template)
        if template is not None:
            for row in rows:
                png = _overlay(out_dir, row, template)
                if png is not None:
                    figures[row["id"]] = png
    notes = [f"Template {settings.get('template', '?')}, atlas {settings.get('atlas') or 'none'}, speed "
             f"{settings.get('speed', '?')}, model {settings.get('model', '?')}.",
             "similarity_after: mean squared local NCC (5-voxel windows) of the warped subject and the template on "
             "the template grid; dice: template atlas vs the subject's labels warped into the template; dice_native: "
             "the atlas brought into the subject vs its labels; folding_pct and std_log_jacobian: over the atlas's "
             "labelled voxels (deepsim.evaluation.jacobian); inverse_residual_p99_vox: 99th percentile of "
             "|φ(φ⁻¹(y)) − y| on the working grid, voxels."]
    if command:
        notes.append(f"Made by: {command}")
    report = render_report(f"deepsim cohort: {out_dir.name}", table, metrics, failures, figures, notes)
    report_path = atomic_write(out_dir / "group_report.html", lambda tmp: Path(tmp).write_text(report))
    run_id = _log_study(out_dir, tracking_uri, settings, table, metrics, [report_path, metrics_path, failures_path])
    return {"report": report_path, "metrics": metrics_path, "failures": failures_path, "rows": table,
            "failed": failures, "run_id": run_id}


def _template_image(settings: dict, load_template) -> np.ndarray | None:
    """The template's T1 image the participant level used (by its settings), for the overlay contours."""
    sources = settings.get("template_sources", {})
    name = settings.get("template", "")
    try:
        if "t1" in sources and not str(sources["t1"]).startswith("nilearn:"):
            return load_template(sources["t1"]).t1w
        resolution = name.removeprefix("MNI152NLin2009aSym").removeprefix("res").replace("p", ".")
        return load_template("MNI152NLin2009aSym" + (f":res-{resolution}" if resolution else "")).t1w
    except Exception:  # the report is still written, without contours' template (named in the notes)
        return None


def _log_study(out_dir: Path, tracking_uri: str | None, settings: dict, table: list[dict], metrics: list[str],
               artifacts: list[Path | None]) -> str:
    """One parent run for the study, a nested run per subject; returns the parent's run id."""
    from deepsim.tracking.mlflow_tracking import (default_tracking_uri, flatten, log_artifact, log_metrics,
                                                  log_params, setup_tracking, source_tags, stage_run)

    setup_tracking(tracking_uri or default_tracking_uri(out_dir), EXPERIMENT)
    tags = {**source_tags(), "deepsim.cohort.output": str(out_dir.resolve())}
    with stage_run(f"cohort {out_dir.name}", tags=tags, nested=False) as parent:
        log_params({k: v for k, v in flatten(settings).items() if len(k) < 250})
        means = {}
        for m in metrics:
            values = [float(r[m]) for r in table if r.get(m) is not None and np.isfinite(float(r[m]))]
            if values:
                means[f"mean/{m}"] = float(np.mean(values))
        log_metrics({**means, "subjects": float(len(table))})
        for row in table:
            with stage_run(row["id"], tags={"deepsim.cohort.subject": row["id"]}):
                log_metrics({m: float(row[m]) for m in metrics if row.get(m) is not None})
        for path in artifacts:
            if path is not None:
                log_artifact(path)
        return parent.info.run_id
