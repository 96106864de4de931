"""``deepsim cohort BIDS_DIR OUTPUT_DIR participant|group``: a whole study registered to a template and back.

Participant level: every T1w image (:mod:`deepsim.data.bids`) is registered to the template
(:mod:`deepsim.data.templates`) by the accurate path of ``deepsim register`` (affine, network, instance
optimisation: a :class:`~deepsim.registration.pipeline.Registrar` with the same stages and defaults), subjects
batched (:func:`deepsim.registration.batch.register_batch`), and each subject's derivatives written
(:mod:`.cohort_outputs`). The loop, built for hundreds of subjects:

- a torch DataLoader with ``workers`` processes reads, checks and normalises the images while the main process
  registers; a thread pool compresses and writes the files while the next batch registers; at most two batches'
  outputs wait to be written, so memory stays flat;
- a subject that fails (an unreadable file, a geometry that cannot be registered, any error) is recorded in
  ``logs/failures/<prefix>.json`` (with its traceback) and the others go on; the command exits 1 at the end,
  naming them, and ``failures.csv`` lists them;
- every subject's files are staged and renamed into place, its summary JSON written last: a rerun skips subjects
  whose summary exists with the same settings and whose files are all there (an interrupted run resumes);
- under ``torchrun`` rank ``r`` of ``W`` takes subjects ``r, r + W, ...``, each rank on its own device;
- ``speed="fast"``: instance optimisation stops at half resolution (no full-resolution level), the CPU schedule.

Group level (:func:`run_group`): the per-subject summaries and failures gathered into ``group_metrics.csv``,
``failures.csv`` and one self-contained HTML report (:mod:`deepsim.evaluation.group_report`), and one MLflow parent
run for the study with a nested run per subject and the report as an artifact.

The raw dataset is only read: the output folder may not be the dataset or lie inside it (except under its
``derivatives/``), and every file is written inside the output folder.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepsim import __version__
from deepsim.data.bids import CohortItem, write_label_table
from deepsim.data.templates import Template
from deepsim.errors import DatasetError, OutputError
from deepsim.io import atomic_write, make_staging_dir
from deepsim.output_folder import own_output_folder
from deepsim.workflows.cohort_outputs import (compose_outputs, is_complete, marker_name, output_names, publish,
                                              write_outputs)

__all__ = ["CohortSettings", "run_participant", "run_cohort", "check_output_location", "ITERATIONS", "COMMAND"]

COMMAND = "deepsim cohort"
#: instance optimisation steps per pyramid level (shrink 4, 2, 1): ``accurate`` is ``deepsim register``'s default;
#: ``fast`` stops at half resolution, where ANTs SyN's antspyx default stops too (DESIGN.md §8)
ITERATIONS = {"accurate": (50, 30, 15), "fast": (50, 30, 0)}
_CODE_URL = "https://github.com/deepsim-registration/deepsim"


@dataclass
class CohortSettings:
    """What a cohort run is made with; ``fingerprint()`` is stored with each subject (a rerun with other settings
    redoes it)."""

    template: str | None = None
    atlas: str | None = None
    speed: str = "accurate"
    model: str | None = None
    device: str = "cpu"
    batch_size: int = 1
    workers: int = 0
    writers: int = 4
    labels_dir: str | None = None
    progress: bool = False
    transform: str | None = None  # the instance optimisation's transform model (None: its default)

    def fingerprint(self, template: Template, model_path: str) -> dict:
        from deepsim.registration.instance import DEFAULT_TRANSFORM

        return {"template": template.name, "template_sources": template.sources, "atlas": template.atlas_name,
                "speed": self.speed, "iterations": list(ITERATIONS[self.speed]), "model": model_path,
                "transform": self.transform or DEFAULT_TRANSFORM, "deepsim": __version__}


def check_output_location(bids_dir: Path | None, out_dir: Path) -> None:
    """OutputError when ``out_dir`` is the raw dataset, lies inside it outside ``derivatives/``, or holds it."""
    if bids_dir is None:
        return
    raw, out = bids_dir.resolve(), out_dir.resolve()
    if out == raw or raw.is_relative_to(out):
        raise OutputError(f"{out_dir}: the output folder may not be the BIDS dataset {bids_dir} or hold it")
    if out.is_relative_to(raw) and not out.is_relative_to(raw / "derivatives"):
        raise OutputError(f"{out_dir} lies inside the BIDS dataset {bids_dir}; write derivatives to "
                          f"{bids_dir / 'derivatives' / 'deepsim'} or outside the dataset")


class _Subjects(Dataset):
    """Items read, checked and normalised (in DataLoader workers): ``{"index", "affine", "header", "raw", "norm",
    "labels"}`` tensors, or ``{"index", "error", "traceback"}`` when the files cannot be used."""

    def __init__(self, items: list[CohortItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from deepsim.registration.inference import load_native, normalise_intensity

        item = self.items[index]
        try:
            image = load_native(item.t1w, "T1w image")
            if image.ndim != 3:
                raise DatasetError(f"{item.t1w}: a {image.ndim}D image; a T1w image is 3D")
            labels = None
            if item.labels is not None:
                lab = load_native(item.labels, "label map")
                if lab.array.shape != image.array.shape or not np.allclose(lab.affine, image.affine, atol=1e-3):
                    raise DatasetError(f"{item.labels}: label map grid {lab.array.shape} does not match its image "
                                       f"{item.t1w} {image.array.shape}")
                labels = torch.from_numpy(np.round(lab.array).astype(np.int32))
            return {"index": index, "affine": image.affine, "header": image.header,
                    "raw": torch.from_numpy(np.asarray(image.array, dtype=np.float32)),
                    "norm": torch.from_numpy(normalise_intensity(image)), "labels": labels}
        except Exception as exc:  # any reason a subject cannot be used is recorded, not raised (module docstring)
            return {"index": index, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class _Run:
    """The state of one participant-level run."""

    out_dir: Path
    template: Template
    settings: dict
    failed: dict[str, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)

    def failure_path(self, item: CohortItem) -> Path:
        return self.out_dir / "logs" / "failures" / f"{item.prefix}.json"

    def fail(self, item: CohortItem, error: str, trace: str) -> None:
        self.failed[item.prefix] = error
        record = {"subject": item.subject, "session": item.session, "t1w": str(item.t1w), "error": error,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "traceback": trace}
        atomic_write(self.failure_path(item), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))

    def succeed(self, item: CohortItem) -> None:
        self.done.append(item.prefix)
        self.failure_path(item).unlink(missing_ok=True)


def _prepare_output(out_dir: Path, template: Template, overwrite: bool) -> None:
    """Own ``out_dir`` (created and marked, or ours before) and write the dataset-level files once."""
    with own_output_folder(out_dir, COMMAND, overwrite, wait=True):
        description = {
            "Name": f"deepsim cohort: T1w images registered to {template.name}", "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "deepsim", "Version": __version__, "CodeURL": _CODE_URL,
                             "Description": "deepsim cohort: affine, network and instance optimisation to a template"}],
            "TemplateSources": template.sources}
        atomic_write(out_dir / "dataset_description.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(description, indent=2) + "\n"))
        ignore = "logs/\nfailures.csv\ngroup_metrics.csv\ngroup_report.html\nmlflow.db*\nmlartifacts/\n"
        atomic_write(out_dir / ".bidsignore", lambda tmp: Path(tmp).write_text(ignore))
        if template.atlas is not None:
            atomic_write(out_dir / f"desc-{template.atlas_name}_dseg.tsv",
                         lambda tmp: write_label_table(Path(tmp), template.atlas_labels))


def _registrar(model, speed: str, device: torch.device, transform: str | None = None):
    """The accurate path of ``deepsim register``: affine, the model's network, instance optimisation (its loss,
    the ``transform`` model; ConfigError for one that cannot use that loss)."""
    from deepsim.errors import ConfigError
    from deepsim.registration.affine import AffineRegistration
    from deepsim.registration.instance import InstanceOptimisation, check_transform, instance_similarity
    from deepsim.registration.pipeline import Registrar

    loss = model.similarity or "ncc"
    try:
        check_transform(transform, loss)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    similarity = instance_similarity(loss, 3, model.models_dir, device)
    optimiser = InstanceOptimisation(similarity, transform=transform, iterations=ITERATIONS[speed], loss_name=loss)
    return Registrar(affine=AffineRegistration(), network=model.network, optimiser=optimiser,
                     spacing_mm=model.spacing_mm, size_multiple=model.size_multiple)


def run_participant(items: list[CohortItem], out_dir: str | Path, template: Template, settings: CohortSettings,
                    rank: int = 0, world_size: int = 1, overwrite: bool = False) -> _Run:
    """Register this rank's share of ``items`` (module docstring); returns the run's record (done, failed)."""
    from deepsim.geometry import Grid
    from deepsim.registration.inference import NativeImage, normalise_intensity
    from deepsim.registration.model import resolve_model
    from deepsim.losses.ncc import LocalNCCLoss

    out_dir = Path(out_dir)
    device = torch.device(settings.device)
    model = resolve_model(settings.model, device)
    registrar = _registrar(model, settings.speed, device, settings.transform)  # bad settings refused before output
    _prepare_output(out_dir, template, overwrite)
    run = _Run(out_dir, template, settings.fingerprint(template, str(model.checkpoint)))
    names = {item.prefix: output_names(item, template.name, template.atlas_name) for item in items}
    for item in items[rank::world_size]:  # staging folders a killed run left behind (ours: this rank's items)
        for stale in out_dir.glob(f".{item.prefix}.*"):
            shutil.rmtree(stale, ignore_errors=True)
    mine = [item for item in items[rank::world_size] if not is_complete(out_dir, item, run.settings)]
    if not mine:
        return run
    template_grid = Grid(template.shape, template.affine)
    template_norm = torch.as_tensor(normalise_intensity(NativeImage(Path(template.name), template.t1w,
                                                                    template.affine, None)), device=device)
    atlas = torch.as_tensor(template.atlas, device=device) if template.atlas is not None else None
    similarity = LocalNCCLoss(3, window=5)
    loader = DataLoader(_Subjects(mine), batch_size=max(1, settings.batch_size), num_workers=settings.workers,
                        collate_fn=list, worker_init_fn=_single_thread if settings.workers else None,
                        prefetch_factor=2 if settings.workers else None)
    pending: deque[tuple[CohortItem, Future, Path]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            item, future, staging = pending.popleft()
            try:
                future.result()
                run.succeed(item)
            except Exception as exc:  # a write that failed (disk full, ...) fails this subject only
                run.fail(item, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def finish(item: CohortItem, sample: dict, registration, files: ThreadPoolExecutor) -> None:
        outputs = compose_outputs(registration, template_grid, atlas, sample["raw"].to(device), sample["affine"],
                                  sample["header"], None if sample["labels"] is None else sample["labels"].to(device),
                                  similarity, template_norm, sample["norm"].to(device))
        summary = {"subject": item.subject, "session": item.session, "t1w": str(item.t1w),
                   "labels": str(item.labels) if item.labels else None, "settings": run.settings,
                   "outputs": names[item.prefix] | {}, "metrics": outputs.metrics,
                   "affine_ras": registration.matrix.tolist(), "timings": registration.timings, "rank": rank,
                   "device": str(device), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        staging = make_staging_dir(out_dir, f".{item.prefix}.")

        def write() -> None:
            staged = write_outputs(outputs, names[item.prefix], staging, files.submit)
            with own_output_folder(out_dir / f"sub-{item.subject}", COMMAND, wait=True):
                publish(staged, out_dir / item.folder, out_dir / item.folder / marker_name(item), summary)

        pending.append((item, writer.submit(write), staging))

    with ThreadPoolExecutor(max_workers=max(1, settings.writers)) as files, \
            ThreadPoolExecutor(max_workers=1) as writer:
        for batch in loader:
            good = []
            for sample in batch:
                item = mine[sample["index"]]
                if "error" in sample:
                    run.fail(item, sample["error"], sample["traceback"])
                else:
                    good.append(sample)
            try:
                pairs = list(zip(good, _register(registrar, template_norm, template.affine, good, device,
                                                 settings.progress)))
            except Exception:  # one subject can spoil a batch (e.g. out of memory): each alone, to find it
                pairs = [(sample, None) for sample in good]
            for sample, registration in pairs:
                item = mine[sample["index"]]
                try:
                    if registration is None:
                        registration = _register(registrar, template_norm, template.affine, [sample], device,
                                                 settings.progress)[0]
                    finish(item, sample, registration, files)
                except Exception as exc:
                    run.fail(item, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            del batch, good, pairs
            drain(limit=2 * max(1, settings.batch_size))
        drain(limit=0)
    return run


def _register(registrar, template_norm, template_affine, samples, device, progress):
    from deepsim.registration.batch import register_batch

    movings = [(s["norm"].to(device, non_blocking=True), s["affine"]) for s in samples]
    return register_batch(registrar, template_norm, template_affine, movings, progress=progress)


def write_failures_csv(out_dir: Path) -> tuple[Path, list[dict]]:
    """``failures.csv`` from every failure record under ``logs/failures`` (header only when there are none)."""
    import csv
    import io

    records = []
    for path in sorted((out_dir / "logs" / "failures").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["subject", "session", "t1w", "error", "time"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    path = atomic_write(out_dir / "failures.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    return path, records


def run_cohort(bids_dir: Path | None, out_dir: Path, settings: CohortSettings, participant_labels=None,
               subjects_csv: Path | None = None, overwrite: bool = False) -> tuple[_Run, int]:
    """The participant level as the CLI runs it: inputs found, this rank's share registered (under torchrun: rank
    striding, a process group only to wait for the others), ``failures.csv`` written by rank 0 at the end. Returns
    the run and the number of items in the study."""
    from deepsim.data.bids import find_t1w, read_subjects_csv
    from deepsim.data.templates import load_template
    from deepsim.engine import distributed

    check_output_location(bids_dir, out_dir)
    template = load_template(settings.template, settings.atlas)
    if subjects_csv is not None:
        items = read_subjects_csv(subjects_csv)
        if participant_labels:
            wanted = {label.removeprefix("sub-") for label in participant_labels}
            items = [item for item in items if item.subject in wanted]
    else:
        items = find_t1w(bids_dir, participant_labels, settings.labels_dir, template.atlas_name)
    rank, world = 0, 1
    if distributed.launched_by_torchrun():
        device = distributed.init_from_env(backend="gloo" if settings.device.startswith("cpu") else None)
        if not settings.device.startswith("cpu"):
            settings.device = str(device)
        rank, world = distributed.rank(), distributed.world_size()
    try:
        run = run_participant(items, out_dir, template, settings, rank, world, overwrite)
        distributed.barrier()
        if rank == 0:
            write_failures_csv(out_dir)
    finally:
        distributed.destroy()
    return run, len(items)

