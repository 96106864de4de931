"""``deepsim reproduce``: every loss on every dataset, several seeds, a noise study, one report, one MLflow parent run.

An experiment config (``configs/experiments/<name>.json``) wires it:

    {"description": "...", "experiment": "paper-reproduction", "seeds": [0, 1, 2],
     "noise_levels": [0.0, 0.05, 0.1, 0.2],
     "datasets": [{"name": "brain_mri", "profile": "paper_brain", "published": {...}}, ...]}

For each dataset and seed, the dataset's profile runs through :func:`deepsim.workflow.run_pipeline` (the same
stages the main job runs, nested under this run) into ``<out>/<dataset>/seed<k>/``; then the bundle's evaluate stage
scores the same trained models on noisy copies of the test pairs (``report_noise<σ>/``). All rows are gathered into
``<out>/report/all_results.csv`` and :mod:`deepsim.experiments.report` writes ``<out>/report/<name>.md`` + PNGs.
A seed whose clean and noisy results already exist under ``<out>`` (from an interrupted run with the same config)
is read back instead of retrained when ``resume=True``.
"""

from __future__ import annotations

import dataclasses

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from deepsim.errors import ConfigError
from deepsim.io import atomic_write
from deepsim.tracking import mlflow_tracking as tracking

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "load_experiment", "run_reproduction"]

_KEYS = {"description", "experiment", "seeds", "noise_levels", "datasets"}
_DATASET_KEYS = {"name", "profile", "published", "losses"}


@dataclass
class Experiment:
    name: str
    experiment: str
    seeds: list[int]
    noise_levels: list[float]
    datasets: list[dict[str, Any]]
    description: str = ""
    source: str = field(default="")


def load_experiment(name_or_path: str) -> Experiment:
    """Load ``configs/experiments/<name>.json`` (or a path) and check its keys and values."""
    from deepsim.workflow import read_config_json

    path, raw = read_config_json(name_or_path, "experiments", _KEYS)
    datasets = raw.get("datasets", [])
    if not datasets:
        raise ConfigError(f"{path}: 'datasets' must list at least one dataset")
    for ds in datasets:
        bad = set(ds) - _DATASET_KEYS
        if bad or "name" not in ds or "profile" not in ds:
            raise ConfigError(f"{path}: each dataset needs 'name' and 'profile' (optional 'published', 'losses'); "
                              f"got keys {sorted(ds)}")
    noise = [float(s) for s in raw.get("noise_levels", [0.0])]
    if any(s < 0 for s in noise):
        raise ConfigError(f"{path}: noise_levels must be ≥ 0, got {noise}")
    if 0.0 not in noise:
        noise = [0.0, *noise]
    return Experiment(name=path.stem, experiment=raw.get("experiment", path.stem),
                      seeds=[int(s) for s in raw.get("seeds", [0, 1, 2])], noise_levels=sorted(noise),
                      datasets=datasets, description=raw.get("description", ""), source=str(path))


def _noise_tag(sigma: float) -> str:
    return f"{sigma:g}".replace(".", "p")


def _read_results(path: Path, dataset: str, seed: int, sigma: float) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame["noise_std"] = float(sigma)
    frame.insert(0, "seed", seed)
    frame.insert(0, "dataset", dataset)
    return frame


def _environment(device: str | None) -> str:
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") and torch.cuda.is_available() else platform.processor()
    import monai

    return (f"Machine: {dev} ({name or platform.machine()}), {torch.get_num_threads()} CPU threads; torch "
            f"{torch.__version__}, monai {monai.__version__}, Python {platform.python_version()}; "
            f"git {tracking.git_commit()[:10]}.")


def _gallery(profile, seed_dir: Path, losses: Sequence[str], device: str | None, out_png: Path) -> Path:
    """Qualitative figure of the first test pair: every trained loss of one seed."""
    from deepsim.data.pairs import PairDataset
    from deepsim.engine.checkpoints import load_network, registration_checkpoint_path
    from deepsim.evaluation.evaluate import register_pair
    from deepsim.evaluation.figures import plot_method_gallery
    from deepsim.spatial import warp_image

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pair = PairDataset(seed_dir / "data" / "datalist.json", "test")[0]
    results = {}
    with torch.no_grad():
        for loss in ["identity", *losses]:
            net = None
            if loss != "identity":
                net = load_network(registration_checkpoint_path(seed_dir / "models", loss), map_location=dev)
                net = net.to(dev).eval()
            out = register_pair(net, pair, dev)
            results[loss] = (warp_image(out["moving"], out["ddf"])[0, 0].cpu(), out["ddf"][0].cpu())
    return plot_method_gallery(pair["fixed"], pair["moving"], results, out_png)


def run_reproduction(
    experiment: Experiment,
    output_dir: str | Path,
    datasets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    resume: bool = True,
    command: str = "deepsim reproduce",
    report_name: str = "paper",
) -> tuple[Path, pd.DataFrame]:
    """Run the experiment; returns ``(report_markdown_path, all_results)``."""
    from deepsim.experiments.report import summary_numbers, write_report
    from deepsim.workflow import bundle_dir, check_losses, load_profile, run_pipeline, stage_common, tracked_stage

    output_dir = Path(output_dir).resolve()
    chosen = [d for d in experiment.datasets if datasets is None or d["name"] in datasets]
    if not chosen:
        raise ConfigError(f"none of the datasets {list(datasets or [])} is in experiment {experiment.name!r} "
                          f"({[d['name'] for d in experiment.datasets]})")
    seeds = [int(s) for s in (seeds if seeds is not None else experiment.seeds)]
    output_dir.mkdir(parents=True, exist_ok=True)  # the default store lives in it (a store's folder must exist)
    uri = tracking.setup_tracking(tracking_uri or tracking.default_tracking_uri(output_dir), experiment.experiment)
    tags = {**tracking.source_tags(), "kind": "reproduce", "experiment_config": experiment.name}
    frames, galleries = [], {}
    started = time.perf_counter()
    with tracking.stage_run(f"reproduce-{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags,
                            nested=False) as parent:
        tracking.log_params({"experiment": experiment.name, "seeds": seeds, "noise_levels": experiment.noise_levels,
                             "datasets": [d["name"] for d in chosen], "device": device or "auto"})
        tracking.log_artifact(experiment.source, "config")
        for ds in chosen:
            # the paper's methods only (identity and the losses): no affine or hybrid rows of the accurate path
            profile = dataclasses.replace(load_profile(ds["profile"]), hybrids=[])
            losses = check_losses(ds.get("losses", profile.losses))
            bundle = bundle_dir(profile.bundle)
            for seed in seeds:
                seed_dir = output_dir / ds["name"] / f"seed{seed}"
                reports = {s: seed_dir / ("report" if s == 0 else f"report_noise{_noise_tag(s)}")
                           for s in experiment.noise_levels}
                done = resume and all((r / "results.csv").is_file() for r in reports.values()) and all(
                    (seed_dir / "models" / f"registration_{loss}.pt").is_file() for loss in losses)
                logger.info(f"reproduce {ds['name']} seed {seed}" + (" (results found, reused)" if done else ""))
                if not done:
                    run_pipeline(profile, seed_dir, losses=losses, device=device, seed=seed, progress=progress,
                                 nested=True)
                    common = stage_common(profile, seed_dir, seed, progress, device)
                    for sigma in experiment.noise_levels:
                        if sigma == 0:
                            continue
                        logger.info(f"evaluation with noise σ={sigma:g}")
                        tracked_stage(f"evaluation-noise{sigma:g}", "evaluate",
                                      {**common, "methods": ["identity", *losses], "noise_std": sigma,
                                       "figures": False, "report_dir": str(reports[sigma])},
                                      {**tags, "dataset": ds["name"], "seed": str(seed), "noise_std": f"{sigma:g}"},
                                      bundle=bundle)
                for sigma, rdir in reports.items():
                    frames.append(_read_results(rdir / "results.csv", ds["name"], seed, sigma))
            galleries[ds["name"]] = _gallery(profile, output_dir / ds["name"] / f"seed{seeds[0]}", losses, device,
                                             output_dir / "report" / f"{report_name}_{ds['name']}_qualitative.png")
        results = pd.concat(frames, ignore_index=True)
        report_dir = output_dir / "report"
        atomic_write(report_dir / "all_results.csv", lambda tmp: results.to_csv(tmp, index=False))
        published = {d["name"]: d["published"] for d in chosen if d.get("published")}
        path = write_report(results, report_dir, command, published, galleries, _environment(device), report_name)
        tracking.log_metrics({f"test/{k}": v for k, v in summary_numbers(results).items()})
        tracking.log_metrics({"reproduce/wall_time_s": time.perf_counter() - started})
        tracking.log_artifact(report_dir, "report")
        logger.info(f"reproduction report: {path}")
        logger.info(f"parent MLflow run: {parent.info.run_id} ({uri})")
    return path, results
