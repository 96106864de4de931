"""Learning curves that outlive a machine: every logged metric appended to a CSV, and the CSV logged to MLflow later.

Long GPU training runs as a chain of short calls on a machine without MLflow (DESIGN.md §9); each call appends its
epochs to one ``curve.csv`` that travels back with the checkpoint, so the curve of the whole chain is one file.
:func:`log_curve` then writes it into one MLflow run (metric histories with the training iteration as step).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path

from deepsim.tracking.active import active_run_id

__all__ = ["CurveLog", "read_curve", "log_curve", "CURVE_FIELDS"]

CURVE_FIELDS = ("iteration", "epoch", "metric", "value", "wall_time")


class CurveLog:
    """A ``log_fn(metrics, epoch)`` for the engine's handlers: one CSV row per metric, ``iteration`` =
    ``epoch * epoch_length``; also logged to the active MLflow run, if any (step = iteration)."""

    def __init__(self, path: str | Path, epoch_length: int):
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
        self.path, self.epoch_length = Path(path), int(epoch_length)

    def __call__(self, metrics: Mapping[str, float], epoch: int) -> None:
        iteration, now = int(epoch) * self.epoch_length, time.time()
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:  # appended and flushed per epoch: a killed call keeps its rows
            writer = csv.writer(f)
            if new:
                writer.writerow(CURVE_FIELDS)
            for name, value in metrics.items():
                writer.writerow([iteration, int(epoch), name, repr(float(value)), f"{now:.3f}"])
        if active_run_id() is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=iteration)


def read_curve(path: str | Path) -> list[dict]:
    """The rows of a curve CSV, the last value kept where a resumed call logged an epoch again."""
    rows: dict[tuple[int, str], dict] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            key = (int(row["iteration"]), row["metric"])
            rows[key] = {"iteration": key[0], "epoch": int(row["epoch"]), "metric": key[1],
                         "value": float(row["value"]), "wall_time": float(row["wall_time"])}
    return [rows[k] for k in sorted(rows)]


def log_curve(path: str | Path, tracking_uri: str, experiment: str, run_name: str,
              params: Mapping[str, object] | None = None) -> str:
    """Log the curve at ``path`` as one MLflow run (created) in ``experiment``; returns the run id."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={"deepsim.curve": str(Path(path).name)})
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    rows = read_curve(path)
    metrics = [Metric(r["metric"], r["value"], int(r["wall_time"] * 1000), r["iteration"]) for r in rows]
    for start in range(0, len(metrics), 900):  # the REST API takes at most 1000 metrics a batch
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 900])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
