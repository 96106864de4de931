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

__all__ = [
    "STAGE_FILES",
    "Profile",
    "bundle_dir",
    "check_losses",
    "load_profile",
    "prepare_and_pretrain",
    "registration_overrides",
    "run_pipeline",
    "run_stage",
    "stage_common",
    "tracked_stage",
]

STAGE_FILES = {
    "preprocess": "preprocess.json",
    "feature_ae": "train_feature_ae.json",
    "feature_seg": "train_feature_seg.json",
    "registration": "train_registration.json",
    "evaluate": "evaluate.json",
    "inference": "inference.json",
}
_PROFILE_KEYS = {"description", "experiment", "bundle", "common", "losses", "stages", "lambdas"}


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
    bundle: str = "brain_mri"
    source: str = field(default="")


def read_config_json(name_or_path: str, folder: str, allowed: set[str]) -> tuple[Path, dict]:
    """``configs/<folder>/<name>.json`` (a bare name) or a JSON path -> ``(path, content)``, keys checked."""
    kind = folder.rstrip("s")
    path = Path(name_or_path)
    if not path.suffix:
        path = _package_path("deepsim.configs", folder, f"{name_or_path}.json")
    if not path.is_file():
        raise ConfigError(f"{kind} {name_or_path!r}: no such {kind} file ({path})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return path, raw


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (``quick``, ``default``, ``full``) or from a JSON path; validate its keys."""
    path, raw = read_config_json(name_or_path, "profiles", _PROFILE_KEYS)
    bad = [loss for loss in raw.get("losses", []) if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"{path}: unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    return Profile(name=path.stem, experiment=raw.get("experiment", path.stem), common=raw.get("common", {}),
                   losses=list(raw.get("losses", SIMILARITY_NAMES)), stages=raw.get("stages", {}),
                   lambdas=raw.get("lambdas", {}), description=raw.get("description", ""),
                   bundle=raw.get("bundle", "brain_mri"), source=str(path))


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


def stage_common(profile: Profile, output_dir: Path, seed: int = 0, progress: bool = True,
                 device: str | None = None) -> dict[str, Any]:
    """The overrides every stage of ``profile`` gets: the profile's ``common`` values, output folder, seed, device."""
    common = {**profile.common, "output_dir": str(output_dir), "seed": seed, "progress": progress}
    if device:
        common["device"] = f"$torch.device({device!r})"
    return common


def registration_overrides(profile: Profile, common: Mapping[str, Any], loss: str) -> dict[str, Any]:
    """Overrides of the registration stage for ``loss``: profile stage values, per-loss values, its lambda."""
    overrides = {**common, **profile.stages.get("registration", {}),
                 **profile.stages.get("registration_by_loss", {}).get(loss, {}), "similarity": loss}
    if loss in profile.lambdas:
        overrides["regularization_weight"] = profile.lambdas[loss]
    return overrides


def registration_artifacts(models_dir: Path, loss: str) -> list[tuple[Path, str]]:
    """What a registration run logs under ``checkpoint/``: the network and, for a DeepSim loss, its feature net,
    so ``deepsim register --model runs:/<id>`` finds both (instance optimisation needs the loss)."""
    artifacts = [(models_dir / f"registration_{loss}.pt", "checkpoint")]
    if FEATURE_NET_OF.get(loss):
        artifacts.append((models_dir / f"feature_{FEATURE_NET_OF[loss]}.pt", "checkpoint"))
    return artifacts


def check_losses(losses: Sequence[str]) -> list[str]:
    bad = [loss for loss in losses if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    return list(losses)


def prepare_and_pretrain(profile: Profile, common: Mapping[str, Any], losses: Sequence[str],
                         tags: Mapping[str, str], bundle: Path) -> None:
    """Stages 1 and 2: prepare the data, then pretrain the feature nets that ``losses`` need (tracked runs)."""
    output_dir = Path(common["output_dir"])
    _print(f"[deepsim] 1/4 preparing data in {output_dir / 'data'}")
    tracked_stage("preprocess", "preprocess", common, tags, bundle=bundle)
    for kind in sorted({FEATURE_NET_OF[loss] for loss in losses} - {None}):
        name = f"feature_{kind}"
        _print(f"[deepsim] 2/4 feature pretraining: {name}")
        tracked_stage(name, name, {**common, **profile.stages.get(name, {})}, tags,
                      [(output_dir / "models" / f"{name}.pt", "checkpoint")], bundle=bundle)


def run_pipeline(
    profile: Profile,
    output_dir: str | Path,
    tracking_uri: str | None = None,
    losses: Sequence[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    nested: bool = False,
) -> tuple[Any, str]:
    """Run every stage of ``profile`` into ``output_dir``.

    ``nested=True`` keeps the currently active MLflow run (and its tracking set-up) as this pipeline's parent,
    as ``deepsim reproduce`` does for its seeds and datasets.

    Returns ``(summary, tracking_uri)``: the evaluation summary (pandas DataFrame, one row per method) and the
    MLflow tracking URI the runs went to.
    """
    output_dir = Path(output_dir).resolve()
    losses = check_losses(losses or profile.losses)  # before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)
    if nested:
        import mlflow

        uri = mlflow.get_tracking_uri()
    else:
        uri = tracking.setup_tracking(tracking_uri or tracking.default_tracking_uri(output_dir), profile.experiment)
    bundle = bundle_dir(profile.bundle)
    common = stage_common(profile, output_dir, seed, progress, device)
    tags = {"git_commit": tracking.git_commit(), "dataset": str(profile.common.get("dataset")), "seed": str(seed),
            "profile": profile.name, "bundle": profile.bundle}
    started = time.perf_counter()
    run_name = f"pipeline-{profile.name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.stage_run(run_name, tags, nested=nested) as parent:
        tracking.log_params({"profile": profile.name, "losses": losses, **common})
        tracking.log_artifact(profile.source, "config")
        _print(f"[deepsim] profile {profile.name!r}: {profile.description}")
        prepare_and_pretrain(profile, common, losses, tags, bundle)
        run_ids = {}
        for loss in losses:
            _print(f"[deepsim] 3/4 registration training: {loss}")
            run_ids[loss], _ = tracked_stage(f"registration-{loss}", "registration",
                                             registration_overrides(profile, common, loss),
                                             {**tags, "similarity": loss},
                                             registration_artifacts(output_dir / "models", loss), bundle=bundle)
        _print("[deepsim] 4/4 evaluation on the held-out test pairs")
        eval_id, parser = tracked_stage("evaluation", "evaluate", {**common, "methods": ["identity", *losses]},
                                        tags, [(output_dir / "report", "report")], bundle=bundle)
        summary = parser.get_parsed_content("evaluate")
        _log_test_metrics(summary, run_ids, eval_id)
        tracking.log_metrics({"pipeline/wall_time_s": time.perf_counter() - started})
        _print(f"[deepsim] parent MLflow run: {parent.info.run_id}")
    return summary, uri


def tracked_stage(run_name: str, stage: str, overrides: Mapping[str, Any], tags: Mapping[str, str],
                  artifacts: Sequence[tuple[Path, str]] = (), bundle: Path | None = None) -> tuple[str, Any]:
    """Run one bundle stage inside a nested MLflow run: params, the merged stage config and ``artifacts`` logged.

    Returns ``(run_id, parser)``; ``parser`` is the stage's resolved config (read results with
    ``parser.get_parsed_content(...)``).
    """
    with tracking.stage_run(run_name, tags) as run:
        tracking.log_params(overrides)
        parser = run_stage(stage, overrides, bundle=bundle)
        tracking.log_dict(parser.get(), f"config/{stage}.json")
        for path, artifact_path in artifacts:
            tracking.log_artifact(path, artifact_path)
    return run.info.run_id, parser


def _log_test_metrics(summary, run_ids: Mapping[str, str], evaluation_run_id: str) -> None:
    """Test metrics per method on the evaluation run, and ``test/*`` on each registration run (compare in the UI)."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for row in summary.to_dict("records"):
        for key in ("dice_mean", "dice_std", "folding_pct", "std_logjac"):
            value = float(row[key])
            client.log_metric(evaluation_run_id, f"test/{row['method']}/{key}", value)
            if row["method"] in run_ids:
                client.log_metric(run_ids[row["method"]], f"test/{key}", value)
