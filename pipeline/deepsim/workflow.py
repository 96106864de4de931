"""The main job: run the bundle's stage configs in order, each inside a nested MLflow run.

preprocess -> feature pretraining (AE, seg; only those the chosen losses need) -> registration (one run per loss)
-> evaluation. Each stage is exactly the bundle config ``python -m monai.bundle run`` would execute
(``common.json`` + the stage file), with the profile's values as overrides: there is no second code path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from deepsim.errors import ConfigError
from deepsim.registration.similarity import FEATURE_NET_OF, SIMILARITY_NAMES
from deepsim.tracking import mlflow_tracking as tracking

__all__ = ["Profile", "load_profile", "bundle_dir", "run_stage", "run_pipeline", "STAGE_FILES"]

STAGE_FILES = {
    "preprocess": "preprocess.json",
    "feature_ae": "train_feature_ae.json",
    "feature_seg": "train_feature_seg.json",
    "registration": "train_registration.json",
    "evaluate": "evaluate.json",
    "inference": "inference.json",
}
_PROFILE_KEYS = {"description", "experiment", "common", "losses", "stages", "lambdas"}


def _package_path(package: str, *parts: str) -> Path:
    return Path(str(resources.files(package).joinpath(*parts)))


def bundle_dir(name: str = "brain_mri") -> Path:
    """The installed copy of ``bundles/<name>`` (the repository's folder in an editable install)."""
    path = _package_path("deepsim.bundles", name)
    if not (path / "configs" / "common.json").is_file():
        raise ConfigError(f"bundle {name!r} not found at {path}")
    return path


@dataclass
class Profile:
    """A named set of overrides for the bundle (configs/profiles/<name>.json)."""

    name: str
    experiment: str
    common: dict[str, Any]
    losses: list[str]
    stages: dict[str, dict[str, Any]]
    lambdas: dict[str, float]
    description: str = ""
    source: str = field(default="")


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (``quick``, ``default``, ``full``) or from a JSON path; validate its keys."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _package_path("deepsim.configs", "profiles", f"{name_or_path}.json")
    if not path.is_file():
        raise ConfigError(f"profile {name_or_path!r}: no such profile file ({path})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    unknown = set(raw) - _PROFILE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_PROFILE_KEYS)}")
    bad = [loss for loss in raw.get("losses", []) if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"{path}: unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    return Profile(name=path.stem, experiment=raw.get("experiment", path.stem), common=raw.get("common", {}),
                   losses=list(raw.get("losses", SIMILARITY_NAMES)), stages=raw.get("stages", {}),
                   lambdas=raw.get("lambdas", {}), description=raw.get("description", ""), source=str(path))


def run_stage(stage: str, overrides: Mapping[str, Any], bundle: Path | None = None) -> Any:
    """Run one bundle stage (``common.json`` + its stage file) through MONAI's ``ConfigWorkflow``.

    Returns the workflow's parser, so callers can read resolved values (e.g. ``evaluate``'s result).
    """
    from monai.bundle import ConfigWorkflow

    # MONAI's bundle runner logs that we pass no logging file and no workflow type on every stage: noise here.
    logging.getLogger("monai.bundle").setLevel(logging.ERROR)
    bundle = bundle or bundle_dir()
    configs = bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / "common.json"), str(configs / STAGE_FILES[stage])],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **dict(overrides),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow.parser


def _print(msg: str) -> None:
    print(msg, flush=True)


def run_pipeline(
    profile: Profile,
    output_dir: str | Path,
    tracking_uri: str | None = None,
    losses: Sequence[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> "Any":
    """Run every stage of ``profile`` into ``output_dir``; return the evaluation summary (pandas DataFrame)."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    losses = list(losses or profile.losses)
    bad = [loss for loss in losses if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    uri = tracking.setup_tracking(tracking_uri or tracking.default_tracking_uri(output_dir), profile.experiment)
    common = {**profile.common, "output_dir": str(output_dir), "seed": seed, "progress": progress}
    if device:
        common["device"] = f"$torch.device({device!r})"
    kinds = sorted({FEATURE_NET_OF[loss] for loss in losses} - {None})
    tags = {"git_commit": tracking.git_commit(), "dataset": str(profile.common.get("dataset")), "seed": str(seed),
            "profile": profile.name}
    started = time.perf_counter()
    with tracking.stage_run(f"pipeline-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags, nested=False) as parent:
        tracking.log_params({"profile": profile.name, "losses": losses, **common})
        tracking.log_artifact(profile.source, "config")
        _print(f"[deepsim] profile {profile.name!r}: {profile.description}")
        _print(f"[deepsim] 1/4 preparing data in {output_dir / 'data'}")
        with tracking.stage_run("preprocess", tags):
            tracking.log_params(common)
            run_stage("preprocess", common)
        for i, kind in enumerate(kinds):
            name = f"feature_{kind}"
            _print(f"[deepsim] 2/4 feature pretraining: {name}")
            overrides = {**common, **profile.stages.get(name, {})}
            with tracking.stage_run(name, tags):
                tracking.log_params(overrides)
                run_stage(name, overrides)
                tracking.log_artifact(output_dir / "models" / f"feature_{kind}.pt", "checkpoint")
        run_ids = {}
        for loss in losses:
            _print(f"[deepsim] 3/4 registration training: {loss}")
            overrides = {**common, **profile.stages.get("registration", {}),
                         **profile.stages.get("registration_by_loss", {}).get(loss, {}), "similarity": loss}
            if loss in profile.lambdas:
                overrides["regularization_weight"] = profile.lambdas[loss]
            with tracking.stage_run(f"registration-{loss}", {**tags, "similarity": loss}) as run:
                run_ids[loss] = run.info.run_id
                tracking.log_params(overrides)
                run_stage("registration", overrides)
                tracking.log_artifact(output_dir / "models" / f"registration_{loss}.pt", "checkpoint")
        _print("[deepsim] 4/4 evaluation on the held-out test pairs")
        with tracking.stage_run("evaluation", tags):
            parser = run_stage("evaluate", {**common, "methods": ["identity", *losses]})
            summary = parser.get_parsed_content("evaluate")
            report = output_dir / "report"
            tracking.log_artifact(report, "report")
            for row in summary.to_dict("records"):
                tracking.log_metrics({f"test/{row['method']}/dice_mean": row["dice_mean"],
                                      f"test/{row['method']}/folding_pct": row["folding_pct"],
                                      f"test/{row['method']}/std_logjac": row["std_logjac"]})
        _log_test_metrics_to_loss_runs(summary, run_ids)
        tracking.log_metrics({"pipeline/wall_time_s": time.perf_counter() - started})
        _print(f"[deepsim] parent MLflow run: {parent.info.run_id}")
    return summary, uri


def _log_test_metrics_to_loss_runs(summary, run_ids: Mapping[str, str]) -> None:
    """Give each registration run its own ``test/*`` metrics, so runs compare side by side in the MLflow UI."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for row in summary.to_dict("records"):
        run_id = run_ids.get(row["method"])
        if run_id is None:
            continue
        for key in ("dice_mean", "dice_std", "folding_pct", "std_logjac"):
            if key in row:
                client.log_metric(run_id, f"test/{key}", float(row[key]))
