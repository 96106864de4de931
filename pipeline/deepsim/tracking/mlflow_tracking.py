"""MLflow set-up and logging in one place (DESIGN.md §5).

Default store: a SQLite file ``<output_dir>/mlflow.db`` (MLflow 3 is SQLite-first); ``--tracking-uri`` points at a
server instead. One experiment per dataset, one parent run per pipeline invocation, nested runs per stage.
Every function here is a no-op when no run is active, so stages also run untracked (e.g. from a bare bundle).

Faults: an unreachable server stops the run at start-up with a one-line ConfigError within
:data:`PROBE_TIMEOUT_S` seconds (:func:`check_store` connects first), or, with a ``fallback_uri``, the runs go to
that local store with a warning (copy them later with ``deepsim sync-runs``, :mod:`.sync`). A SQLite store whose
folder does not exist or cannot be written is refused the same way, before anything is written; a new SQLite store
is created and migrated by one process at a time (:func:`deepsim.output_folder.store_lock`), so runs started
together never break it.
Artifact uploads and metric batches are retried with backoff (:data:`RETRIES`, :data:`BACKOFF_S`); one that still
fails is reported on stderr at once, kept in :func:`failed_uploads`, and turned into a TrackingError (exit ≠ 0) by
:func:`raise_failed_uploads` at the end of the job: never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from deepsim.errors import ConfigError, TrackingError, first_line
from deepsim.output_folder import store_lock
from deepsim.tracking.active import active_run_id

__all__ = ["default_tracking_uri", "setup_tracking", "stage_run", "log_epoch_metrics", "log_params",
           "log_artifact", "log_dict", "log_datalist", "flatten", "git_commit", "source_tags", "ui_command",
           "failed_uploads", "raise_failed_uploads", "with_retries", "RETRIES", "BACKOFF_S", "check_store",
           "sqlite_path", "PROBE_TIMEOUT_S"]

#: attempts of one upload (artifact, dict, metric batch) before it is reported as failed
RETRIES = 3
#: wait before the second attempt; doubled before each further one
BACKOFF_S = 2.0
_FAILED: list[str] = []
#: seconds to wait for a tracking server to accept a connection before calling it unreachable
PROBE_TIMEOUT_S = 3.0


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory databases)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _probe_http(tracking_uri: str) -> None:
    """ConfigError unless the server (or the HTTP(S) proxy requests would go through) accepts a TCP connection."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts, via = urlsplit(tracking_uri), ""
    proxy = getproxies().get(parts.scheme)
    if proxy and parts.hostname and not proxy_bypass(parts.hostname):
        parts, via = urlsplit(proxy if "://" in proxy else f"http://{proxy}"), f" through the proxy {proxy}"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc))
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: not reachable (no connection{via} within "
                          f"{PROBE_TIMEOUT_S:g} s: {reason})") from None


def _check_sqlite(tracking_uri: str) -> None:
    path = sqlite_path(tracking_uri)
    if path is None:
        return
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: the folder {folder} does not exist (create it, or "
                          "check the path: sqlite:/// + an absolute path has four slashes)")
    if path.is_dir():
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: {path} is a folder, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: {path} is not writable (permission denied)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: cannot write into {folder} (permission denied; "
                          "SQLite needs to create its journal beside the database)")


def check_store(tracking_uri: str) -> None:
    """ConfigError, in seconds and one line, when ``tracking_uri`` cannot work; writes nothing.

    http(s): the server must accept a TCP connection within :data:`PROBE_TIMEOUT_S` (message "not reachable");
    ``sqlite:///PATH``: PATH's folder must exist and be writable (MLflow would create the folder silently, or retry
    for minutes); ``file:`` stores are not supported.
    """
    if tracking_uri.startswith(("file:", "./", "/")) and not tracking_uri.startswith("sqlite"):
        raise ConfigError(f"tracking URI {tracking_uri!r}: file stores are not supported; use sqlite:///PATH or http(s)://")
    if tracking_uri.startswith(("http://", "https://")):
        _probe_http(tracking_uri)
    elif tracking_uri.startswith("sqlite:"):
        _check_sqlite(tracking_uri)


def setup_tracking(tracking_uri: str, experiment: str, fallback_uri: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` and select ``experiment``; returns the URI in use.

    An unreachable ``tracking_uri`` is a one-line ConfigError, unless ``fallback_uri`` (a local ``sqlite:///``
    store) is given: then a warning names both and the command that copies the runs over later, and the runs go
    to the fallback store.
    """
    try:
        return _setup_tracking(tracking_uri, experiment)
    except ConfigError as exc:
        if fallback_uri is None or fallback_uri == tracking_uri or "not reachable" not in str(exc):
            raise
        print(f"deepsim: warning: {exc}; logging to {fallback_uri} instead. Copy the runs to the server later "
              f"with: deepsim sync-runs --from {fallback_uri} --to {tracking_uri}", file=sys.stderr, flush=True)
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        return _setup_tracking(fallback_uri, experiment)


def _setup_tracking(tracking_uri: str, experiment: str) -> str:
    import mlflow

    check_store(tracking_uri)
    # The environment variable would otherwise silently win over what we set (DESIGN.md §6).
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow logs "Creating initial MLflow database tables..." and each migration at INFO: not for users' stderr
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    database = sqlite_path(tracking_uri)
    try:
        # one process at a time creates (and migrates) a SQLite store and its experiment: two runs started together
        # would otherwise both migrate it, fail, and leave it broken for good (_alembic_tmp_* tables)
        with store_lock(database) if database is not None else nullcontext():
            if database is not None and mlflow.get_experiment_by_name(experiment) is None:
                # artifacts beside the database (MLflow's default is ./mlruns under the current directory)
                store = database.resolve().parent / "mlartifacts"
                mlflow.create_experiment(experiment, artifact_location=store.as_uri())
            mlflow.set_experiment(experiment)
    except Exception as exc:
        first = first_line(exc)
        if database is None:
            raise ConfigError(f"MLflow tracking URI {tracking_uri}: not reachable ({type(exc).__name__}: "
                              f"{first})") from exc
        hint = ("; an MLflow schema migration was interrupted there before (restore the file from a backup or start "
                "a new store)" if "_alembic_tmp" in str(exc) else "")
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: the store cannot be used ({type(exc).__name__}: "
                          f"{first}){hint}") from exc
    return tracking_uri


@contextmanager
def stage_run(name: str, tags: Mapping[str, str] | None = None, nested: bool = True,
              run_id: str | None = None, system_metrics: bool = False) -> Iterator[Any]:
    """Start a (nested) MLflow run named ``name``, or continue the run ``run_id`` (``deepsim run --resume``);
    ended as FAILED if the body raises. ``system_metrics``: MLflow samples CPU, memory, disk and network use
    (and GPU use with ``nvidia-ml-py``) every 10 s into the run's ``system/*`` metrics (needs ``psutil``)."""
    import mlflow

    nested = nested and mlflow.active_run() is not None
    sample = system_metrics and _can_sample_system()
    if run_id is not None:
        with mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=sample) as run:
            yield run
        return
    with mlflow.start_run(run_name=name, nested=nested, tags=dict(tags or {}), log_system_metrics=sample) as run:
        yield run


def _can_sample_system() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def with_retries(what: str, upload: Any) -> bool:
    """Call ``upload()`` up to :data:`RETRIES` times with doubling waits; a final failure is reported on stderr
    and remembered for :func:`raise_failed_uploads`. True when it succeeded."""
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            upload()
            return True
        except Exception as exc:  # MLflow raises many types (MlflowException, requests' and OS errors)
            if attempt == RETRIES:
                reason = (str(exc).splitlines() or [""])[0][:200]
                message = f"{what} (after {RETRIES} attempts: {type(exc).__name__}: {reason})"
                _FAILED.append(message)
                print(f"deepsim: warning: MLflow upload failed: {message}", file=sys.stderr, flush=True)
                return False
            time.sleep(delay)
            delay *= 2
    return False


def failed_uploads() -> list[str]:
    """What could not be uploaded so far in this process (one description each, naming the local file)."""
    return list(_FAILED)


def raise_failed_uploads() -> None:
    """Raise a TrackingError listing every failed upload (and forget them); nothing when all went through."""
    if _FAILED:
        failed, _FAILED[:] = list(_FAILED), []
        raise TrackingError(f"{len(failed)} MLflow upload(s) failed; the files are still on disk: " + "; ".join(failed))


def _active() -> bool:
    return active_run_id() is not None


#: (run id, metric) pairs whose history this process has looked at (see :func:`log_epoch_metrics`)
_SEEN_KEYS: set[tuple[str, str]] = set()


def _logged_before(run_id: str, key: str, step: int) -> bool:
    """Whether ``key`` already has a value at ``step`` in the run: the first epoch a resumed training logs may
    have been logged by the process that was killed after logging it and before saving its epoch-end state."""
    if (run_id, key) in _SEEN_KEYS:
        return False
    _SEEN_KEYS.add((run_id, key))
    from mlflow.tracking import MlflowClient

    try:
        return any(m.step == step for m in MlflowClient().get_metric_history(run_id, key))
    except Exception:  # the history could not be read: log the value (a repeated point, never a lost one)
        return False


def log_epoch_metrics(metrics: Mapping[str, float], epoch: int) -> None:
    """Log per-epoch metrics (e.g. ``train/loss``) to the active run, step = epoch; a metric the run already has
    at this epoch (logged by a killed process whose training this one resumed) is not logged twice."""
    if _active():
        import mlflow

        run_id = mlflow.active_run().info.run_id
        values = {k: float(v) for k, v in metrics.items() if not _logged_before(run_id, k, int(epoch))}
        if not values:
            return
        with_retries(f"metrics {sorted(values)} of epoch {epoch} to run {mlflow.active_run().info.run_id}",
                      lambda: mlflow.log_metrics(values, step=int(epoch)))


def log_metrics(metrics: Mapping[str, float]) -> None:
    if _active():
        import mlflow

        values = {k: float(v) for k, v in metrics.items()}
        with_retries(f"metrics {sorted(values)} to run {mlflow.active_run().info.run_id}",
                      lambda: mlflow.log_metrics(values))


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts/lists to ``a.b.0`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def log_params(params: Mapping, only_new: bool = False) -> None:
    """Log ``params`` flattened; ``only_new`` skips keys the run already has (a resumed run, whose params were
    logged before: MLflow refuses to change a param's value)."""
    if _active():
        import mlflow

        flat = flatten(params)
        if only_new:
            existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
            flat = {k: v for k, v in flat.items() if k not in existing}
        keys = sorted(flat)
        for i in range(0, len(keys), 100):  # MLflow caps one batch at 100 params
            mlflow.log_params({k: flat[k] for k in keys[i:i + 100]})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or folder to the active run, with retries (see :func:`failed_uploads`)."""
    if _active() and Path(path).exists():
        import mlflow

        run_id = mlflow.active_run().info.run_id
        what = f"artifact {Path(path).resolve()} -> run {run_id} artifact path {artifact_path or '.'}"
        if Path(path).is_dir():
            with_retries(what, lambda: mlflow.log_artifacts(str(path), artifact_path))
        else:
            with _umask_mode_copy(Path(path)) as source:
                with_retries(what, lambda: mlflow.log_artifact(str(source), artifact_path))


@contextmanager
def _umask_mode_copy(path: Path) -> Iterator[Path]:
    """``path``, or a same-named copy with the umask's mode when its own differs (an installed config file is 0644
    whatever the user's umask): MLflow's local artifact store copies a file's mode along with its bytes."""
    from deepsim.io import file_mode

    if path.stat().st_mode & 0o777 == file_mode():
        yield path
        return
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deepsim-artifact-") as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        os.chmod(copy, file_mode())
        yield copy


def log_dict(content: Mapping, artifact_file: str) -> None:
    """Store ``content`` as a JSON artifact (e.g. the merged bundle config of a stage)."""
    if _active():
        import mlflow

        plain = json.loads(json.dumps(content, default=str))
        with_retries(f"artifact {artifact_file} (a dict, not on disk) -> run {mlflow.active_run().info.run_id}",
                      lambda: mlflow.log_dict(plain, artifact_file))


def log_datalist(datalist: str | Path, dataset: str, splits: Mapping[str, str]) -> None:
    """``mlflow.log_input`` of the datalist's ``splits`` (split -> context, e.g. ``{"training": "training"}``):
    one MLflow dataset per split (its rows: image, label, subject, ...), named ``<dataset>/<split>``, with the
    datalist file as its source, so the runs that used the same data share a dataset digest."""
    if not _active() or not splits:
        return
    import mlflow
    import pandas as pd

    entries = json.loads(Path(datalist).read_text())
    for split, context in splits.items():
        rows = [{k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in row.items()}
                for row in entries.get(split, [])]
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        with warnings.catch_warnings():  # a local path matches two of MLflow's registered source types: it warns
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            # integer columns (e.g. a synthesis seed) get a hint about missing values when logged: a datalist has none
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            data = mlflow.data.from_pandas(frame, source=str(Path(datalist).resolve()), name=f"{dataset}/{split}")
            with_retries(f"dataset {dataset}/{split} ({datalist}) -> run {mlflow.active_run().info.run_id}",
                         lambda data=data, context=context: mlflow.log_input(data, context=context))


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags for our code: ``mlflow.source.git.commit`` (when the package sits in a git
    checkout) and the deepsim version. MLflow's own detection looks at the entry point's folder, which is the
    virtualenv's ``bin/`` for the ``deepsim`` command, not our source tree."""
    from deepsim import __version__

    commit = git_commit()
    tags = {"deepsim.version": __version__}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    """Commit of the deepsim source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens these runs in the MLflow UI."""
    if tracking_uri.startswith("http"):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"
