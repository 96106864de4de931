"""MLflow set-up and logging in one place (DESIGN.md §5).

Default store: a SQLite file ``<output_dir>/mlflow.db`` (MLflow 3 is SQLite-first); ``--tracking-uri`` points at a
server instead. One experiment per dataset, one parent run per pipeline invocation, nested runs per stage.
Every function here is a no-op when no run is active, so stages also run untracked (e.g. from a bare bundle).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepsim.errors import ConfigError

__all__ = ["default_tracking_uri", "setup_tracking", "stage_run", "log_epoch_metrics", "log_params",
           "log_artifact", "log_dict", "flatten", "git_commit", "ui_command"]


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def setup_tracking(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at ``tracking_uri`` and select ``experiment``; fail fast with a one-line error if unreachable."""
    import mlflow

    if tracking_uri.startswith(("file:", "./", "/")) and not tracking_uri.startswith("sqlite"):
        raise ConfigError(f"tracking URI {tracking_uri!r}: file stores are not supported; use sqlite:///PATH or http(s)://")
    # The environment variable would otherwise silently win over what we set (DESIGN.md §6).
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("http"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        if tracking_uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
            # artifacts beside the database (MLflow's default is ./mlruns under the current directory)
            store = Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
            mlflow.create_experiment(experiment, artifact_location=store.as_uri())
        mlflow.set_experiment(experiment)
    except Exception as exc:
        raise ConfigError(f"MLflow tracking URI {tracking_uri}: not reachable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return tracking_uri


@contextmanager
def stage_run(name: str, tags: Mapping[str, str] | None = None, nested: bool = True) -> Iterator[Any]:
    """Start a (nested) MLflow run named ``name``; ended as FAILED if the body raises."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=nested and mlflow.active_run() is not None,
                          tags=dict(tags or {})) as run:
        yield run


def _active() -> bool:
    import mlflow

    return mlflow.active_run() is not None


def log_epoch_metrics(metrics: Mapping[str, float], epoch: int) -> None:
    """Log per-epoch metrics (e.g. ``train/loss``) to the active run, step = epoch."""
    if _active():
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(epoch))


def log_metrics(metrics: Mapping[str, float]) -> None:
    if _active():
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


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


def log_params(params: Mapping) -> None:
    if _active():
        import mlflow

        flat = flatten(params)
        keys = sorted(flat)
        for i in range(0, len(keys), 100):  # MLflow caps one batch at 100 params
            mlflow.log_params({k: flat[k] for k in keys[i:i + 100]})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if _active() and Path(path).exists():
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)


def log_dict(content: Mapping, artifact_file: str) -> None:
    """Store ``content`` as a JSON artifact (e.g. the merged bundle config of a stage)."""
    if _active():
        import mlflow

        mlflow.log_dict(json.loads(json.dumps(content, default=str)), artifact_file)


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
