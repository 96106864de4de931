"""The main job: run the bundle's stage configs in order, each inside a nested MLflow run.

preprocess -> feature pretraining (AE, seg; only those the chosen losses need) -> registration (one run per loss)
-> evaluation. Each stage is exactly the bundle config ``python -m monai.bundle run`` would execute
(``common.json`` + the stage file), with the profile's values as overrides: there is no second code path.

``distributed=True`` (``torchrun ... deepsim run --distributed``) adds each training stage's
``multi_gpu_<stage>.json``, as ``torchrun ... -m monai.bundle run`` would; rank 0 alone prepares the data, evaluates
and talks to MLflow while the other ranks train beside it (docs/distributed.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepsim.console import quiet_libraries
from deepsim.engine.distributed import barrier, is_main_process
from deepsim.config_check import check_profile
from deepsim.errors import ConfigError
from deepsim.output_folder import check_apart, check_output_folder, check_replaceable, own_output_folder
from deepsim.losses.registry import FEATURE_NET_OF, SIMILARITY_NAMES
from deepsim.resources import bundle_dir, package_path
from deepsim.run_record import RunRecord, run_settings
from deepsim.tracking import mlflow_tracking as tracking
from deepsim.tracking.models import log_network_model, logged_candidates, register_best, registered_name
from deepsim.tracking.settings import log_inputs, log_settings

__all__ = [
    "STAGE_FILES",
    "Profile",
    "bundle_dir",
    "check_losses",
    "check_registration_init",
    "evaluation_methods",
    "load_profile",
    "network_of_row",
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
#: the data-parallel override each training stage gets under torchrun (MONAI model-zoo ``multi_gpu_*`` convention)
MULTI_GPU_FILES = {
    "feature_ae": "multi_gpu_train_feature_ae.json",
    "feature_seg": "multi_gpu_train_feature_seg.json",
    "registration": "multi_gpu_train_registration.json",
}
logger = logging.getLogger(__name__)
_PROFILE_KEYS = {"description", "experiment", "bundle", "common", "losses", "stages", "lambdas", "hybrids",
                 "networks_after_affine"}


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
    #: losses whose hybrid ``<loss>+io`` (affine, network, instance optimisation) the evaluation stage scores
    hybrids: list[str] = field(default_factory=list)
    #: score each network after the affine stage (rows ``affine+<loss>``) instead of alone; false in every shipped
    #: profile until a network pretrained on affinely aligned synthetic pairs ships (``registration_init``)
    networks_after_affine: bool = False
    bundle: str = "brain_mri"
    source: str = field(default="")


def read_config_json(name_or_path: str, folder: str, allowed: set[str]) -> tuple[Path, dict]:
    """``configs/<folder>/<name>.json`` (a bare name) or a JSON path -> ``(path, content)``, keys checked."""
    kind = folder.rstrip("s")
    path = Path(name_or_path)
    if not path.suffix:
        path = package_path("deepsim.configs", folder, f"{name_or_path}.json")
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
    bundle = raw.get("bundle", "brain_mri")
    check_profile(path, raw, bundle_dir(bundle if isinstance(bundle, str) else "brain_mri") / "configs", STAGE_FILES,
                  SIMILARITY_NAMES)  # known keys, the bundle's value types: a typo stops here, not hours later
    bad = [loss for loss in raw.get("losses", []) if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"{path}: unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    return Profile(name=path.stem, experiment=raw.get("experiment", path.stem), common=raw.get("common", {}),
                   losses=list(raw.get("losses", SIMILARITY_NAMES)), stages=raw.get("stages", {}),
                   lambdas=raw.get("lambdas", {}), description=raw.get("description", ""),
                   hybrids=list(raw.get("hybrids", [])), networks_after_affine=raw.get("networks_after_affine", False),
                   bundle=raw.get("bundle", "brain_mri"), source=str(path))


def run_stage(stage: str, overrides: Mapping[str, Any], bundle: Path | None = None, distributed: bool = False,
              on_ready: Callable[[Any], None] | None = None) -> Any:
    """Run one bundle stage (``common.json`` + its stage file) through MONAI's ``ConfigWorkflow``.

    ``distributed``: a training stage also reads its ``multi_gpu_*.json`` (every rank of a torchrun job runs it).
    ``on_ready(parser)`` is called once the config is parsed, before the stage runs (tracking logs its settings).

    Returns the workflow's parser, so callers can read resolved values (e.g. ``evaluate``'s result).
    """
    from monai.bundle import ConfigWorkflow

    # MONAI's bundle runner logs that we pass no logging file and no workflow type on every stage: noise here,
    # unless deepsim itself logs at DEBUG (-v). Its loggers are (re)created at INFO by the import above.
    quiet_libraries()
    bundle = bundle or bundle_dir()
    configs = bundle / "configs"
    files = [configs / "common.json", configs / STAGE_FILES[stage]]
    if distributed and stage in MULTI_GPU_FILES:
        files.append(configs / MULTI_GPU_FILES[stage])
    workflow = ConfigWorkflow(
        config_file=[str(f) for f in files],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **{"bundle_root": str(bundle), **dict(overrides)},  # the bundle's own files (models/model.pt), from any cwd
    )
    workflow.initialize()
    if on_ready is not None:
        on_ready(workflow.parser)
    workflow.run()
    workflow.finalize()
    return workflow.parser


def _print(msg: str) -> None:
    if is_main_process():  # one voice under torchrun
        logger.info(msg)


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


def check_registration_init(profile: Profile, common: Mapping[str, Any], losses: Sequence[str]) -> None:
    """Each loss's ``registration_init`` (the network its training starts from), resolved as its stage will resolve
    it and checked (:func:`deepsim.engine.warm_start.check_init`): a missing file or another architecture stops
    the job in one line before any data are prepared."""
    from monai.bundle import ConfigParser

    from deepsim.engine.warm_start import check_init

    bundle = bundle_dir(profile.bundle)
    configs = bundle / "configs"
    for loss in losses:
        parser = ConfigParser()
        parser.read_config([str(configs / "common.json"), str(configs / STAGE_FILES["registration"])])
        parser.update({"bundle_root": str(bundle), **registration_overrides(profile, common, loss)})
        init = parser.get_parsed_content("registration_init")
        if init:
            check_init(init, "registration_net", parser.get_parsed_content("network_kwargs"))


def registration_artifacts(models_dir: Path, loss: str) -> list[tuple[Path, str]]:
    """What a registration run logs under ``checkpoint/``: the network and, for a DeepSim loss, its feature net,
    so ``deepsim register --model runs:/<id>`` finds both (instance optimisation needs the loss)."""
    artifacts = [(models_dir / f"registration_{loss}.pt", "checkpoint")]
    if FEATURE_NET_OF.get(loss):
        artifacts.append((models_dir / f"feature_{FEATURE_NET_OF[loss]}.pt", "checkpoint"))
    return artifacts


def registration_models(models_dir: Path, loss: str) -> list[tuple[Path, list[Path]]]:
    """The MLflow model a registration run logs: its network, with the feature net a DeepSim loss needs inside."""
    kind = FEATURE_NET_OF.get(loss)
    return [(models_dir / f"registration_{loss}.pt", [models_dir / f"feature_{kind}.pt"] if kind else [])]


def check_losses(losses: Sequence[str]) -> list[str]:
    bad = [loss for loss in losses if loss not in SIMILARITY_NAMES]
    if bad:
        raise ConfigError(f"unknown losses {bad}; choose from {list(SIMILARITY_NAMES)}")
    return list(losses)


def prepare_and_pretrain(profile: Profile, common: Mapping[str, Any], losses: Sequence[str],
                         tags: Mapping[str, str], bundle: Path, distributed: bool = False,
                         record: RunRecord | None = None) -> None:
    """Stages 1 and 2: prepare the data, then pretrain the feature nets that ``losses`` need (tracked runs).

    ``distributed``: rank 0 prepares the data while the other ranks wait; every rank trains. ``record``: see
    :func:`tracked_stage`.
    """
    output_dir = Path(common["output_dir"])
    _print(f"1/4 preparing data in {output_dir / 'data'}")
    if is_main_process():
        tracked_stage("preprocess", "preprocess", common, tags, bundle=bundle, record=record)
    barrier()
    for kind in sorted({FEATURE_NET_OF[loss] for loss in losses} - {None}):
        name = f"feature_{kind}"
        _print(f"2/4 feature pretraining: {name}")
        tracked_stage(name, name, {**common, **profile.stages.get(name, {})}, tags,
                      [(output_dir / "models" / f"{name}.pt", "checkpoint")], bundle=bundle, distributed=distributed,
                      record=record, models=[(output_dir / "models" / f"{name}.pt", [])])


def run_pipeline(
    profile: Profile,
    output_dir: str | Path,
    tracking_uri: str | None = None,
    losses: Sequence[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    nested: bool = False,
    distributed: bool = False,
    resume: bool = False,
    tracking_fallback: bool = False,
    overwrite: bool = False,
) -> tuple[Any, str]:
    """Run every stage of ``profile`` into ``output_dir``.

    ``nested=True`` keeps the currently active MLflow run (and its tracking set-up) as this pipeline's parent,
    as ``deepsim reproduce`` does for its seeds and datasets.

    Returns ``(summary, tracking_uri)``: the evaluation summary (pandas DataFrame, one row per method) and the
    MLflow tracking URI the runs went to.

    ``distributed=True`` (inside a torchrun process group, see :func:`deepsim.engine.distributed.init_from_env`):
    every rank trains each stage data-parallel; only rank 0 prepares, evaluates and tracks. The other ranks return
    ``(None, tracking_uri)`` after the last training stage.

    ``resume=True`` continues the interrupted run in ``output_dir`` (its ``run_record.json``, see
    :mod:`deepsim.run_record`): same MLflow parent and stage runs, finished stages skipped, the interrupted training
    stage restored from its last training state. ``tracking_fallback=True``: an unreachable ``tracking_uri`` logs to
    ``<output_dir>/mlflow.db`` with a warning instead of stopping the run.

    The output folder is held for the whole run (:func:`deepsim.output_folder.own_output_folder`, not when
    ``nested``): a non-empty folder deepsim did not create is refused unless ``overwrite``, and a second run into it
    meanwhile stops at once. Everything that can be checked without writing is checked first: losses, the dataset's
    place (never inside the output folder), the folder, the tracking store.
    """
    output_dir = Path(output_dir).resolve()
    losses = check_losses(losses or profile.losses)  # before anything is written
    check_registration_init(profile, stage_common(profile, output_dir, seed, progress, device), losses)
    dataset = profile.common.get("dataset")
    if isinstance(dataset, str) and dataset not in ("embedded", "cells", "toy") and Path(dataset).exists():
        check_apart(dataset, output_dir / "data", "the profile's dataset")
    settings = run_settings(profile, seed, losses)
    record = RunRecord.load(output_dir) if resume else None
    if record is not None:
        record.check_same(settings)
        if tracking_uri not in (None, record.tracking_uri):  # its runs live in the recorded store
            raise ConfigError(f"--resume: the runs of {output_dir} are in {record.tracking_uri}, not {tracking_uri}; "
                              "resume without --tracking-uri (copy them over afterwards with deepsim sync-runs)")
        tracking_uri = record.tracking_uri
    if nested or not is_main_process():
        return _run_pipeline(profile, output_dir, tracking_uri, losses, device, seed, progress, nested, distributed,
                             resume, tracking_fallback, settings, record)
    check_output_folder(output_dir, "deepsim run", overwrite)
    check_replaceable(output_dir / "data")  # with --overwrite too: prepared data never replace the user's files
    if tracking_uri is not None and not tracking_fallback:
        tracking.check_store(tracking_uri)  # an unreachable server or a missing folder: stop before writing
    with own_output_folder(output_dir, "deepsim run", overwrite):
        return _run_pipeline(profile, output_dir, tracking_uri, losses, device, seed, progress, nested, distributed,
                             resume, tracking_fallback, settings, record)


def _run_pipeline(profile: Profile, output_dir: Path, tracking_uri: str | None, losses: list[str],
                  device: str | None, seed: int, progress: bool, nested: bool, distributed: bool, resume: bool,
                  tracking_fallback: bool, settings: dict, record: RunRecord | None) -> tuple[Any, str]:
    """:func:`run_pipeline` once the output folder is held (and a resumed run's record checked)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    if nested:
        import mlflow

        uri = mlflow.get_tracking_uri()
    elif not main:  # ranks > 0 never touch the MLflow store
        uri = tracking_uri or tracking.default_tracking_uri(output_dir)
    else:
        local = tracking.default_tracking_uri(output_dir)
        uri = tracking.setup_tracking(tracking_uri or local, profile.experiment,
                                      fallback_uri=local if tracking_fallback else None)
    if record is None and not nested:
        record = RunRecord.start(output_dir, settings, uri, profile.experiment)
    elif resume and uri != record.tracking_uri:  # fell back to a local store that does not hold the runs
        raise ConfigError(f"--resume: the runs of {output_dir} are in {record.tracking_uri}, which is not reachable "
                          "now; resume when it is")
    bundle = bundle_dir(profile.bundle)
    common = stage_common(profile, output_dir, seed, progress, device)
    tags = {**tracking.source_tags(), "dataset": str(profile.common.get("dataset")), "seed": str(seed),
            "profile": profile.name, "bundle": profile.bundle}
    started = time.perf_counter()
    run_name = f"pipeline-{profile.name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_id = record.parent_run_id if resume else None
    parent_run = tracking.stage_run(run_name, tags, nested=nested, run_id=parent_id, system_metrics=not nested)
    with (parent_run if main else nullcontext()) as parent:
        if main and record is not None:
            record.parent_run_id, record.resumes = parent.info.run_id, record.resumes + int(resume)
            record.save()
            if resume:
                import mlflow

                mlflow.set_tag("deepsim.resumes", str(record.resumes))
        tracking.log_params({"profile": profile.name, "losses": losses, **common}, only_new=resume)
        tracking.log_artifact(profile.source, "config")
        _print(f"profile {profile.name!r}: {profile.description}")
        prepare_and_pretrain(profile, common, losses, tags, bundle, distributed, record)
        run_ids = {}
        for loss in losses:
            _print(f"3/4 registration training: {loss}")
            run_ids[loss], _ = tracked_stage(f"registration-{loss}", "registration",
                                             registration_overrides(profile, common, loss),
                                             {**tags, "similarity": loss},
                                             registration_artifacts(output_dir / "models", loss), bundle=bundle,
                                             distributed=distributed, record=record,
                                             models=registration_models(output_dir / "models", loss))
        if not main:
            return None, uri
        _print("4/4 evaluation on the held-out test pairs")
        eval_id, parser = tracked_stage("evaluation", "evaluate",
                                        {**common, "methods": evaluation_methods(profile, losses)}, tags,
                                        [(output_dir / "report", "report")], bundle=bundle, record=record)
        if parser is None:  # finished before this --resume: its table is on disk, its metrics in MLflow
            summary = _summary_on_disk(output_dir / "report" / "results.csv")
        else:
            summary = parser.get_parsed_content("evaluate")
            _log_test_metrics(summary, run_ids, eval_id)
        tracking.log_metrics({"pipeline/wall_time_s": time.perf_counter() - started})
        _print(f"parent MLflow run: {parent.info.run_id}")
        if not nested:
            _register_best(run_ids, output_dir / "models", profile.experiment)
    return summary, uri


def evaluation_methods(profile: Profile, losses: Sequence[str]) -> list[str]:
    """What the evaluation stage scores: the identity, every trained network, and, when the profile lists
    ``hybrids``, the affine stage alone and those hybrids that were trained (affine, network, instance
    optimisation): the accurate path's rows beside the learned ones.

    Each network is scored alone (``<loss>``, as it was trained on the prepared pairs), or, with the profile's
    ``networks_after_affine``, after the affine stage (``affine+<loss>``, beside the ``affine`` row): the hybrids'
    start, so every row after ``affine`` shows what its own stage adds to one start (a fine-tuned network pretrained
    on affinely aligned pairs, ``registration_init``)."""
    hybrids = [f"{loss}+io" for loss in profile.hybrids if loss in losses]
    after = profile.networks_after_affine
    networks = [f"affine+{loss}" if after else loss for loss in losses]
    return ["identity", *(["affine"] if hybrids or after else []), *networks, *hybrids]


def network_of_row(method: str) -> str | None:
    """The trained loss whose network a table row shows on its own (``<loss>`` or ``affine+<loss>``), else None."""
    from deepsim.registration.pipeline import parse_method

    try:
        _, network, io_loss = parse_method(method)
    except ValueError:
        return None
    return network if io_loss is None else None


def tracked_stage(run_name: str, stage: str, overrides: Mapping[str, Any], tags: Mapping[str, str],
                  artifacts: Sequence[tuple[Path, str]] = (), bundle: Path | None = None,
                  distributed: bool = False, record: RunRecord | None = None,
                  models: Sequence[tuple[Path, Sequence[Path]]] = ()) -> tuple[str, Any]:
    """Run one bundle stage inside a nested MLflow run: every resolved setting as a param (before it runs), then
    the datalist splits it read as dataset inputs, the merged stage config, ``artifacts`` and ``models``
    (checkpoints logged as MLflow models, each with the extra files it needs: :mod:`deepsim.tracking.models`).

    Returns ``(run_id, parser)``; ``parser`` is the stage's resolved config (read results with
    ``parser.get_parsed_content(...)``). ``distributed``: see :func:`run_stage`; ranks other than 0 run the stage
    untracked and return an empty run id.

    ``record`` (a pipeline's :class:`~deepsim.run_record.RunRecord`) notes the stage's start and end. A stage it
    marks finished is skipped (``parser`` None); one it marks started is continued: the same MLflow run, and the
    bundle stage gets ``resume: true`` (its training restarts from ``models/<stage>.state.pt``).
    """
    if record is not None and record.done(run_name):
        _print(f"{run_name}: finished before, skipped (--resume)")
        return record.run_id(run_name) or "", None
    run_id = record.run_id(run_name) if record is not None else None
    stage_overrides = {**overrides, "resume": True} if run_id is not None else overrides
    if not is_main_process():
        return "", run_stage(stage, stage_overrides, bundle=bundle, distributed=distributed)
    with tracking.stage_run(run_name, tags, run_id=run_id) as run:
        if record is not None:
            record.stage_started(run_name, run.info.run_id)
        parser = run_stage(stage, stage_overrides, bundle=bundle, distributed=distributed,
                           on_ready=lambda parsed: log_settings(parsed, only_new=run_id is not None))
        log_inputs(parser, stage)
        tracking.log_dict(parser.get(), f"config/{stage}.json")
        for path, artifact_path in artifacts:
            tracking.log_artifact(path, artifact_path)
        for checkpoint, extra in models:
            tracking.with_retries(f"MLflow model of {checkpoint} -> run {run.info.run_id}",
                                  lambda c=checkpoint, e=extra: log_network_model(c, c.stem, e))
    if record is not None:
        record.stage_done(run_name)
    return run.info.run_id, parser


def _register_best(run_ids: Mapping[str, str], models_dir: Path, experiment: str) -> None:
    """Register the registration network with the best final validation Dice (:mod:`deepsim.tracking.models`);
    a registry failure is reported like a failed upload and the job finishes."""
    registered: list = []
    tracking.with_retries(f"Model Registry entry {registered_name(experiment)}",
                          lambda: registered.append(register_best(logged_candidates(run_ids, models_dir), experiment)))
    if registered and registered[-1] is not None:
        loss, version, alias = registered[-1]
        _print(f"registered model: {version} ({alias}), the {loss} network (best validation Dice)")


def _summary_on_disk(results_csv: Path):
    """The evaluation summary of a finished run, from its ``results.csv``."""
    import pandas as pd

    from deepsim.evaluation.summary import summarise

    return summarise(pd.read_csv(results_csv))


def _log_test_metrics(summary, run_ids: Mapping[str, str], evaluation_run_id: str) -> None:
    """Test metrics per method on the evaluation run, and ``test/*`` on each registration run (compare in the UI).

    MLflow metric names allow no ``+``: a hybrid ``ncc+io`` is logged as ``test/ncc_io/...``."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for row in summary.to_dict("records"):
        network = network_of_row(row["method"])
        for key in ("dice_mean", "dice_std", "folding_pct", "std_logjac"):
            value = float(row[key])
            client.log_metric(evaluation_run_id, f"test/{row['method'].replace('+', '_')}/{key}", value)
            if network in run_ids:
                client.log_metric(run_ids[network], f"test/{key}", value)
