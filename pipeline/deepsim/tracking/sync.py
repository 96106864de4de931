"""Copy MLflow runs between tracking stores: ``deepsim sync-runs --from sqlite:///out/mlflow.db --to http://host``.

For runs logged to a local store while the server was unreachable (``deepsim run --tracking-fallback local``).
Each finished run is copied with its name, params, tags, every metric's full history (values, steps,
timestamps), artifacts, status and start/end times; nested runs are re-attached to their copied parents. Copies
carry the tag ``deepsim.synced_from = <source run id>``, so a second sync skips them: syncing again after an
interruption, or after more runs were logged, copies only what is missing. Runs still marked RUNNING (in
progress, or killed and not yet resumed) are left out, with their nested runs, until they end.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from deepsim.errors import ConfigError
from deepsim.tracking.mlflow_tracking import with_retries

__all__ = ["SYNC_TAG", "sync_runs"]

SYNC_TAG = "deepsim.synced_from"
_IN_PROGRESS_TAG = "deepsim.sync_in_progress"  # a copy an interrupted sync left unfinished: deleted and redone
_UNFINISHED = {"RUNNING", "SCHEDULED"}
_PARENT = "mlflow.parentRunId"


def _client(uri: str, role: str) -> Any:
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and role == "source" and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"--from {uri}: no such MLflow database")
    if uri.startswith("http"):  # fail fast on a dead server, as setup_tracking does (MLflow retries for minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # unreachable server, wrong scheme, unreadable file
        raise ConfigError(f"{role} tracking URI {uri}: not reachable ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]})") from exc
    return client


def _all_runs(client: Any, experiment_id: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _destination_experiment(dst: Any, dst_uri: str, experiment: Any) -> str:
    found = dst.get_experiment_by_name(experiment.name)
    if found is not None:
        return found.experiment_id
    location = None
    if dst_uri.startswith("sqlite:///"):  # artifacts beside the database, as deepsim's own stores keep them
        location = (Path(dst_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return dst.create_experiment(experiment.name, artifact_location=location)


def _in_order(runs: list) -> list:
    """Finished runs, each after its parent; runs whose parent is unfinished or absent-and-unfinished are dropped."""
    by_id = {r.info.run_id: r for r in runs}
    ordered, placed = [], set()

    def depth(run, seen=()) -> int:
        parent = run.data.tags.get(_PARENT)
        if parent not in by_id or parent in seen:
            return 0
        return 1 + depth(by_id[parent], (*seen, run.info.run_id))

    def finished(run) -> bool:
        parent = run.data.tags.get(_PARENT)
        own = run.info.status not in _UNFINISHED
        return own and (parent not in by_id or finished(by_id[parent]))

    for run in sorted(runs, key=lambda r: (depth(r), r.info.start_time or 0)):
        if finished(run):
            ordered.append(run)
            placed.add(run.info.run_id)
    return ordered


def _copy_run(src: Any, dst: Any, run: Any, experiment_id: str, new_ids: dict[str, str]) -> str:
    from mlflow.entities import Metric, Param, RunTag

    tags = {k: v for k, v in run.data.tags.items() if k != _PARENT}
    parent = run.data.tags.get(_PARENT)
    if parent in new_ids:
        tags[_PARENT] = new_ids[parent]
    tags[_IN_PROGRESS_TAG] = run.info.run_id
    new = dst.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    new_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        dst.log_batch(new_id, params=params[i:i + 100])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), 1000):  # ... and at most 1000 metric values
        dst.log_batch(new_id, metrics=metrics[i:i + 1000])
    if src.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory(prefix="deepsim-sync-") as tmp:
            local = src.download_artifacts(run.info.run_id, "", tmp)
            with_retries(f"artifacts of run {run.info.run_id} (downloaded to {local}, deleted after the sync; "
                          f"still in {src.tracking_uri}) -> run {new_id}", lambda: dst.log_artifacts(new_id, local))
    dst.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
    dst.log_batch(new_id, tags=[RunTag(SYNC_TAG, run.info.run_id)])  # last: only a complete copy counts as synced
    dst.delete_tag(new_id, _IN_PROGRESS_TAG)
    return new_id


def sync_runs(source_uri: str, destination_uri: str, experiments: list[str] | None = None) -> list[tuple[str, str]]:
    """Copy the finished runs of ``source_uri`` (all experiments, or those named) to ``destination_uri``.

    Returns ``(source run id, new run id)`` of every run copied now; runs copied by an earlier sync are skipped.
    ConfigError when either store cannot be reached or a named experiment does not exist.
    """
    if source_uri == destination_uri:
        raise ConfigError(f"--from and --to are the same store ({source_uri})")
    src, dst = _client(source_uri, "source"), _client(destination_uri, "destination")
    chosen = [e for e in src.search_experiments() if experiments is None or e.name in experiments]
    missing = sorted(set(experiments or []) - {e.name for e in chosen})
    if missing:
        raise ConfigError(f"--experiment {missing}: not in {source_uri}")
    copied = []
    for experiment in chosen:
        runs = _all_runs(src, experiment.experiment_id)
        if not runs:
            continue
        experiment_id = _destination_experiment(dst, destination_uri, experiment)
        new_ids = {}
        for copy in _all_runs(dst, experiment_id):
            if SYNC_TAG in copy.data.tags:
                new_ids[copy.data.tags[SYNC_TAG]] = copy.info.run_id
            elif _IN_PROGRESS_TAG in copy.data.tags:
                dst.delete_run(copy.info.run_id)
        for run in _in_order(runs):
            if run.info.run_id in new_ids:
                continue
            new_ids[run.info.run_id] = _copy_run(src, dst, run, experiment_id, new_ids)
            copied.append((run.info.run_id, new_ids[run.info.run_id]))
    return copied
