"""Preparing datasets: preprocessed NIfTI files + a MONAI datalist JSON in one output folder, cached.

Output layout (the same for the embedded brains, users' data and :func:`deepsim.data.pairs.make_toy_dataset`)::

    <out_dir>/datalist.json                      {"training": [...], "validation": [...], "test": [...],
                                                   "label_values", "label_names", "spacing_mm", "roi_size",
                                                   "seed", "params_hash", ...}
    <out_dir>/<id>_image.nii.gz                  float32 in [0, 1], RAS affine of the preprocessed grid
    <out_dir>/<id>_label.nii.gz                  int16 (int32 if values need it), same grid

Each list item is ``{"image": relpath, "label": relpath, "subject": <subject/donor id>, "id": <unique id>}``.
Splits are by subject: no subject of the training list appears in the test list.

A folder is written to a temporary sibling and renamed into place, so a killed run leaves no half dataset.
If ``datalist.json`` already holds the same parameters (``params_hash``), the call returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles

from deepsim.data.alignment import Aligner, reference_grid, resample_to_grid
from deepsim.data.embedded import EMBEDDED_DONORS, dk_label_names, embedded_label_paths
from deepsim.data.synthesis import SynthesizeT1d, brain_mask
from deepsim.data.transforms import (
    Chain,
    augmentation_transforms,
    default_roi_size,
    grid_transforms,
    loading_transforms,
    preprocessing_transforms,
)
from deepsim.errors import ConfigError, DatasetError, OutputError
from deepsim.io import make_staging_dir, smallest_label_dtype
from deepsim.output_folder import check_apart, replace_folder

__all__ = [
    "DEFAULT_TRAIN_DONORS",
    "DEFAULT_TEST_DONORS",
    "prepare_embedded_brains",
    "load_embedded_donors",
    "align_donors",
    "prepare_user_dataset",
    "load_datalist",
    "write_volume",
    "datalist_spacing",
]

# Donors 9861 and 10021 come on a different grid (185×180×192) and have smaller brains than the other four:
# one of each kind is held out, so both kinds are trained and tested on. Three test donors give three distinct
# anatomical test pairs (with two held out there would be one). Fixed, never drawn at random.
DEFAULT_TRAIN_DONORS: tuple[str, ...] = ("9861", "12876", "14380")
DEFAULT_TEST_DONORS: tuple[str, ...] = ("10021", "15496", "15697")
#: With ``alignment="affine"`` every embedded donor is aligned to this (training) donor; see :mod:`deepsim.data.alignment`.
REFERENCE_DONOR = "12876"
DATALIST = "datalist.json"
_FORMAT_VERSION = 4  # bump when the preprocessing changes, so cached folders are rebuilt
_SPLITS = ("training", "validation", "test")


def _seed(*parts: int | str) -> int:
    """A 31-bit seed derived from (dataset seed, donor, role, copy) — independent streams per item."""
    words = [int(p) if isinstance(p, int) else int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def write_volume(tensor: torch.Tensor, affine: np.ndarray, path: Path, is_label: bool) -> None:
    """Write a (1, D, H, W) or (D, H, W) volume as NIfTI with its RAS ``affine`` (sform and qform set)."""
    array = np.asarray(tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor)
    array = array.reshape(array.shape[-3:])
    if is_label:
        array = array.astype(smallest_label_dtype(array))
    else:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _affine(x: torch.Tensor) -> np.ndarray:
    return x.affine.detach().cpu().numpy() if hasattr(x, "affine") else np.eye(4)


def _cached(out_dir: Path, params_hash: str) -> Path | None:
    datalist = out_dir / DATALIST
    if not datalist.is_file():
        return None
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return None
    if content.get("params_hash") != params_hash:
        return None
    items = [it for split in _SPLITS for it in content.get(split, [])]
    if all((out_dir / it["image"]).is_file() and (out_dir / it["label"]).is_file() for it in items):
        return datalist
    return None


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (absent, empty, or a dataset deepsim wrote) by ``tmp_dir`` with renames only; a folder
    holding any file deepsim did not write is refused, nothing deleted (:func:`deepsim.output_folder.replace_folder`)."""
    try:
        replace_folder(tmp_dir, out_dir)
    except OutputError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _write_datalist(tmp_dir: Path, content: dict) -> None:
    (tmp_dir / DATALIST).write_text(json.dumps(content, indent=1))


class _Jobs(Dataset):
    """One job per output subject; workers (forked) share the donors' loaded labels and masks."""

    def __init__(self, jobs: list[dict], run: Callable[[dict], dict]) -> None:
        self.jobs, self.run = jobs, run

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.run(self.jobs[index])
        except DatasetError as exc:  # a worker's exception would reach the user as a multi-line traceback
            return {"error": str(exc)}


def _raise_worker_error(result: dict) -> dict:
    if "error" in result:
        raise DatasetError(result["error"])
    return result


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


def _run_jobs(jobs: list[dict], run: Callable[[dict], dict], num_workers: int, progress: bool, desc: str) -> None:
    loader = DataLoader(
        _Jobs(jobs, run),
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_single_thread if num_workers else None,
        multiprocessing_context="fork" if num_workers else None,
    )
    for result in tqdm(loader, total=len(jobs), desc=desc, disable=not progress, unit="vol"):
        _raise_worker_error(result)


def _default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def prepare_embedded_brains(
    out_dir: Path,
    spacing_mm: float = 2.0,
    roi_size: Sequence[int] | None = None,
    train_donors: Sequence[str] = DEFAULT_TRAIN_DONORS,
    test_donors: Sequence[str] = DEFAULT_TEST_DONORS,
    augment_copies: int = 8,
    test_variants: int = 2,
    seed: int = 0,
    progress: bool = True,
    num_workers: int | None = None,
    reference_donor: str = REFERENCE_DONOR,
    alignment: str = "centre",
    aligner: Aligner | None = None,
) -> Path:
    """Preprocess the six embedded brains (synthesised T1 + DK labels) into ``out_dir``; returns ``datalist.json``.

    - ``training``: per training donor the un-augmented original plus ``augment_copies`` copies, each with its
      own synthesis seed (contrast) and an offline random affine + elastic deformation.
    - ``validation``: one fresh augmented variant per *training* donor. It monitors training; it is **not**
      held out (same anatomy as training).
    - ``test``: ``test_variants`` synthesis variants (different seeds, no deformation) per test donor.

    ``alignment`` chooses how the donors, which live in different native spaces, are brought together:

    - ``"centre"`` (default): resample to ``spacing_mm`` in RAS, crop to the brain and centre-pad to ``roi_size``
      — a translation pre-alignment; each file keeps its own world affine. Mean test-pair Dice of the identity
      is then ≈ 0.15, and the registration network learns the residual global and local misalignment.
    - ``"affine"``: every donor is aligned to ``reference_donor`` by an affine transform estimated on synthesized
      images by ``aligner`` (required then; the bundle passes :func:`deepsim.registration.affine.estimate_affine`,
      torch); image and labels are resampled once, from
      the 1 mm synthesis, onto one RAS grid centred on the reference brain (identity Dice ≈ 0.35). Measured: with
      the CPU default's 250 training steps on 3 donors, no learned loss beat the identity on these pairs
      (MSE 0.329, NCC 0.340, DeepSim-AE 0.340, DeepSim-seg 0.298 vs 0.351) — learning anatomy-specific
      deformation from 3 subjects needs far longer training.

    Every seed is derived from ``seed`` and recorded per item (``synthesis_seed``, ``augmentation_seed``).
    2 mm defaults: 36 volumes of 80×96×80 in 38 s on 2 CPU cores (one measurement, including imports).
    """
    out_dir = Path(out_dir)
    roi = tuple(int(n) for n in (roi_size if roi_size is not None else default_roi_size(spacing_mm)))
    train_donors, test_donors = [str(d) for d in train_donors], [str(d) for d in test_donors]
    unknown = sorted(set(train_donors + test_donors) - set(EMBEDDED_DONORS))
    if unknown:
        raise DatasetError(f"unknown embedded donors {unknown}; available: {list(EMBEDDED_DONORS)}")
    if set(train_donors) & set(test_donors):
        raise DatasetError(f"donors {sorted(set(train_donors) & set(test_donors))} are in both training and test")
    if augment_copies < 0 or test_variants < 1:
        raise DatasetError(f"augment_copies must be ≥ 0 and test_variants ≥ 1, got {augment_copies}, {test_variants}")
    if alignment not in ("centre", "affine"):
        raise DatasetError(f"alignment must be 'centre' or 'affine', got {alignment!r}")
    if alignment == "affine" and aligner is None:
        raise ConfigError("alignment 'affine' needs an aligner, e.g. deepsim.registration.affine.estimate_affine")
    params = {
        "kind": "embedded", "version": _FORMAT_VERSION, "spacing_mm": float(spacing_mm), "roi_size": list(roi),
        "train_donors": train_donors, "test_donors": test_donors, "augment_copies": int(augment_copies),
        "test_variants": int(test_variants), "seed": int(seed), "reference_donor": str(reference_donor),
        "alignment": alignment,
    }  # fmt: skip
    params_hash = _params_hash(params)
    if (hit := _cached(out_dir, params_hash)) is not None:
        return hit

    jobs: list[dict] = []
    for donor in train_donors:
        for k in range(augment_copies + 1):
            aug = _seed(seed, donor, "augment", k) if k else None
            jobs.append({"split": "training", "donor": donor, "id": f"{donor}_{'orig' if k == 0 else f'aug{k:02d}'}",
                         "synthesis_seed": _seed(seed, donor, "synthesis", k), "augmentation_seed": aug})  # fmt: skip
        jobs.append({"split": "validation", "donor": donor, "id": f"{donor}_val",
                     "synthesis_seed": _seed(seed, donor, "val-synthesis"),
                     "augmentation_seed": _seed(seed, donor, "val-augment")})  # fmt: skip
    for donor in test_donors:
        for k in range(test_variants):
            jobs.append({"split": "test", "donor": donor, "id": f"{donor}_v{k}",
                         "synthesis_seed": _seed(seed, donor, "test-synthesis", k), "augmentation_seed": None})  # fmt: skip

    # Load each donor once (1 mm, RAS, coarse crop) with its brain masks; jobs only synthesise and resample.
    loaded = load_embedded_donors(train_donors + test_donors, progress)
    label_values = sorted({int(v) for it in loaded.values() for v in torch.unique(it["label"]).tolist()} | {0})
    if alignment == "affine":
        grid_affine, transforms = align_donors(loaded, str(reference_donor), float(spacing_mm), roi, seed, progress,
                                               aligner)

    tmp_dir = make_staging_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    normalise = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    grid = Chain(grid_transforms(spacing_mm, roi))

    def run(job: dict) -> dict:
        donor = loaded[job["donor"]]
        data = SynthesizeT1d(seed=job["synthesis_seed"], mask_key="masks")(donor)
        if alignment == "centre":
            data = grid({"image": data["image"], "label": data["label"]})
        else:
            data = _to_common_grid(data, transforms[job["donor"]], grid_affine, roi, normalise)
        if job["augmentation_seed"] is not None:
            data = augmentation_transforms(job["augmentation_seed"])(data)
        write_volume(data["image"], _affine(data["image"]), tmp_dir / f"{job['id']}_image.nii.gz", False)
        write_volume(data["label"], _affine(data["label"]), tmp_dir / f"{job['id']}_label.nii.gz", True)
        return {}

    try:
        _run_jobs(jobs, run, _default_workers() if num_workers is None else num_workers, progress, "embedded brains")
        names = dk_label_names()
        content: dict = {split: [] for split in _SPLITS}
        for job in jobs:
            content[job["split"]].append({
                "image": f"{job['id']}_image.nii.gz", "label": f"{job['id']}_label.nii.gz",
                "subject": job["donor"], "id": job["id"],
                "synthesis_seed": job["synthesis_seed"], "augmentation_seed": job["augmentation_seed"],
            })  # fmt: skip
        content.update(_common_keys(label_values, {v: names.get(v, str(v)) for v in label_values}, params, params_hash))
        _write_datalist(tmp_dir, content)
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / DATALIST


def _to_common_grid(data: dict, transform, grid_affine: np.ndarray, roi: Sequence[int], normalise) -> dict:
    """Resample a synthesized donor (1 mm image + labels) onto the common grid through its affine transform."""
    volumes = {}
    for key in ("image", "label"):
        source = data[key]
        array = resample_to_grid(source[0].numpy(), source.affine.numpy(), transform, grid_affine, roi,
                                 is_label=key == "label")
        volumes[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None],
                                  affine=torch.as_tensor(grid_affine))
    return {"image": normalise(volumes["image"].float()), "label": volumes["label"].to(torch.int32)}


def load_embedded_donors(donors: Sequence[str], progress: bool = False) -> dict[str, dict]:
    """Each donor's 1 mm DK label map, loaded, RAS and coarsely cropped, with its brain masks:
    ``{donor: {"label": MetaTensor (1, *S) float32, "masks": brain_mask(...)}}``."""
    paths = embedded_label_paths()
    loaded: dict[str, dict] = {}
    for donor in tqdm(list(donors), desc="load donors", disable=not progress, unit="donor"):
        item = Chain(loading_transforms(None))({"label": str(paths[donor])})
        label = item["label"]
        spacing = np.linalg.norm(label.affine.numpy()[:3, :3], axis=0)
        item["masks"] = brain_mask(label[0].numpy(), spacing)
        loaded[donor] = item
    return loaded


def align_donors(loaded: dict[str, dict], reference: str, spacing_mm: float, roi: Sequence[int], seed: int,
                 progress: bool, aligner: Aligner) -> tuple[np.ndarray, dict]:
    """Affine transform of every loaded item (``{"label", "masks"}``, as :func:`load_embedded_donors` gives) into
    ``reference``'s space, estimated by ``aligner`` on synthesised T1-like images, and the common grid's affine
    (``roi`` voxels of ``spacing_mm``, centred on the reference brain). Transforms map grid points into the item's
    world (None for the reference)."""
    if reference not in loaded:
        raise DatasetError(f"reference donor {reference!r} is not among the prepared donors {sorted(loaded)}")
    synth = {d: SynthesizeT1d(seed=_seed(seed, "alignment"), mask_key="masks")(item)["image"]
             for d, item in loaded.items()}
    label = loaded[reference]["label"]
    idx = np.argwhere(label[0].numpy() > 0)
    centre = label.affine.numpy() @ np.r_[(idx.min(0) + idx.max(0)) / 2.0, 1.0]
    grid_affine = reference_grid(centre[:3], spacing_mm, roi)
    fixed, fixed_affine = synth[reference][0].numpy(), synth[reference].affine.numpy()
    transforms = {}
    for donor in tqdm(sorted(loaded), desc="affine alignment", disable=not progress, unit="donor"):
        transforms[donor] = None if donor == reference else aligner(
            fixed, fixed_affine, synth[donor][0].numpy(), synth[donor].affine.numpy(), seed=seed)
    return grid_affine, transforms


def _common_keys(label_values: list[int], label_names: dict[int, str], params: dict, params_hash: str) -> dict:
    return {
        "label_values": label_values,
        "label_names": {str(v): label_names[v] for v in label_values},
        "spacing_mm": params["spacing_mm"],
        "roi_size": params["roi_size"],
        "seed": params["seed"],
        "params": params,
        "params_hash": params_hash,
    }


# ---------------------------------------------------------------------------------------------------------------
# Users' data
# ---------------------------------------------------------------------------------------------------------------

_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _pairs_from_folder(source: Path) -> list[dict]:
    """``images/`` + ``labels/`` with the same file names, or flat ``<name>_image.nii.gz`` + ``<name>_label.nii.gz``."""
    images_dir, labels_dir = source / "images", source / "labels"
    items = []
    if images_dir.is_dir() and labels_dir.is_dir():
        for image in sorted(p for p in images_dir.iterdir() if p.name.endswith(_SUFFIXES)):
            label = labels_dir / image.name
            if not label.is_file():
                raise DatasetError(f"{image} has no label map {label}")
            items.append({"image": str(image), "label": str(label), "subject": _stem(image)})
    else:
        for image in sorted(source.glob("*_image.nii*")):
            name = _stem(image)[: -len("_image")]
            label = next((source / f"{name}_label{s}" for s in _SUFFIXES if (source / f"{name}_label{s}").is_file()), None)
            if label is None:
                raise DatasetError(f"{image} has no label map {source / (name + '_label.nii.gz')}")
            items.append({"image": str(image), "label": str(label), "subject": name})
    if not items:
        raise DatasetError(
            f"{source} holds no image/label pairs (expected <name>_image.nii.gz + <name>_label.nii.gz, "
            "or images/ and labels/ subfolders with matching file names)"
        )
    return items


def _resolve_inside(root: Path, rel: object, datalist: Path) -> str:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{datalist}: every item needs 'image' and 'label' paths, got {rel!r}")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DatasetError(f"{datalist}: path {rel} escapes the datalist's folder {root}")
    return str(path)


def _check_duplicates(splits: dict[str, list[dict]], source: Path) -> None:
    """An image listed twice in one split, or in both training and test (a leak), is refused, naming both places.
    (Validation may repeat training images: it monitors, it is not held out. Images may share a label map.)"""
    seen: dict[str, str] = {}
    for split in _SPLITS:
        in_split: set[str] = set()
        for i, item in enumerate(splits.get(split, [])):
            image, where = item["image"], f"'{split}' item {i}"
            if image in in_split or (split == "test" and seen.get(image, "").startswith("'training'")):
                raise DatasetError(f"{source}: {image} is listed twice ({seen[image]} and {where})")
            in_split.add(image)
            seen.setdefault(image, where)


def _pairs_from_datalist(source: Path) -> dict[str, list[dict]]:
    try:
        content = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{source} is not a readable JSON datalist ({exc})") from None
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise DatasetError(f"{source} has no 'training' list")
    out: dict[str, list[dict]] = {}
    for split in _SPLITS:
        if split not in content:
            continue
        if not isinstance(content[split], list):
            raise DatasetError(f"{source}: '{split}' must be a list of items")
        items = []
        for i, item in enumerate(content[split]):
            if not isinstance(item, dict):
                raise DatasetError(f"{source}: items of '{split}' must be objects with 'image' and 'label'")
            missing = [k for k in ("image", "label") if k not in item]
            if missing:
                raise DatasetError(f"{source}: '{split}' item {i} lacks {missing} (it has {sorted(item)})")
            image = _resolve_inside(source.parent, item.get("image"), source)
            label = _resolve_inside(source.parent, item.get("label"), source)
            items.append({"image": image, "label": label, "subject": str(item.get("subject", _stem(Path(image))))})
        out[split] = items
    _check_duplicates(out, source)
    return out


def _split_by_subject(items: list[dict], seed: int, test_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    subjects = sorted({it["subject"] for it in items})
    if len(subjects) < 2:
        raise DatasetError(f"need at least 2 subjects to split training from test, got {subjects}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_test = max(1, int(round(test_fraction * len(subjects))))
    test_subjects = {subjects[i] for i in order[:n_test]}
    return [it for it in items if it["subject"] not in test_subjects], [it for it in items if it["subject"] in test_subjects]


def prepare_user_dataset(
    source: Path,
    out_dir: Path,
    spacing_mm: float = 2.0,
    roi_size: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    label_names: dict[int, str] | None = None,
    num_workers: int | None = None,
) -> Path:
    """Preprocess a user's image + label NIfTI pairs into ``out_dir`` (same chain, no synthesis); returns the datalist.

    ``source`` is either
    - a folder with ``images/`` and ``labels/`` subfolders holding files of the same names, or a flat folder of
      ``<name>_image.nii.gz`` + ``<name>_label.nii.gz`` (``<name>`` is the subject), or
    - a MONAI datalist JSON ``{"training": [{"image", "label"[, "subject"]}], "test": [...]}`` with paths
      relative to the JSON's folder (paths that leave that folder are rejected).

    Without a test list, 20 % of the subjects (at least 1; drawn with ``seed``) become the test set. Without a
    validation list, validation repeats the training items (monitoring only, not held out).
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise DatasetError(f"{source} does not exist")
    check_apart(source, out_dir, "dataset")
    splits = _pairs_from_datalist(source) if source.is_file() else {"training": _pairs_from_folder(source)}
    if "test" not in splits:
        splits["training"], splits["test"] = _split_by_subject(splits["training"], seed)
    if "validation" not in splits:
        splits["validation"] = list(splits["training"])
    train_subjects = {it["subject"] for it in splits["training"]}
    shared = sorted(train_subjects & {it["subject"] for it in splits["test"]})
    if shared:
        raise DatasetError(f"{source}: subjects {shared} appear in both training and test")
    roi = tuple(int(n) for n in (roi_size if roi_size is not None else default_roi_size(spacing_mm)))
    fingerprint = sorted((it["image"], it["label"], os.path.getmtime(it["image"]) if os.path.exists(it["image"]) else 0)
                         for s in _SPLITS for it in splits[s])  # fmt: skip
    params = {"kind": "user", "version": _FORMAT_VERSION, "source": str(source.resolve()), "files": fingerprint,
              "spacing_mm": float(spacing_mm), "roi_size": list(roi), "seed": int(seed)}  # fmt: skip
    params_hash = _params_hash(params)
    if (hit := _cached(out_dir, params_hash)) is not None:
        return hit

    # one output per distinct input pair; validation may reuse training files
    unique: dict[tuple[str, str], str] = {}
    for split in _SPLITS:
        for it in splits[split]:
            key = (it["image"], it["label"])
            if key not in unique:
                base, n = _stem(Path(it["image"])).removesuffix("_image"), 1
                name = base
                while name in unique.values():
                    n, name = n + 1, f"{base}_{n}"
                unique[key] = name
    jobs = [{"image": k[0], "label": k[1], "id": v} for k, v in unique.items()]
    chain = preprocessing_transforms(spacing_mm, roi)
    tmp_dir = make_staging_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    values: set[int] = {0}

    def run(job: dict) -> dict:
        data = chain({"image": job["image"], "label": job["label"]})
        write_volume(data["image"], _affine(data["image"]), tmp_dir / f"{job['id']}_image.nii.gz", False)
        write_volume(data["label"], _affine(data["label"]), tmp_dir / f"{job['id']}_label.nii.gz", True)
        return {"values": torch.unique(data["label"]).tolist()}

    try:
        if num_workers is None:
            num_workers = _default_workers() if len(jobs) > 4 else 0
        loader = DataLoader(_Jobs(jobs, run), batch_size=None, num_workers=num_workers,
                            worker_init_fn=_single_thread if num_workers else None,
                            multiprocessing_context="fork" if num_workers else None)  # fmt: skip
        for result in tqdm(loader, total=len(jobs), desc="user dataset", disable=not progress, unit="vol"):
            _raise_worker_error(result)
            values.update(int(v) for v in result["values"])
        content: dict = {split: [] for split in _SPLITS}
        for split in _SPLITS:
            for it in splits[split]:
                name = unique[(it["image"], it["label"])]
                content[split].append({"image": f"{name}_image.nii.gz", "label": f"{name}_label.nii.gz",
                                       "subject": it["subject"], "id": name})  # fmt: skip
        label_values = sorted(values)
        names = {v: (label_names or {}).get(v, "background" if v == 0 else str(v)) for v in label_values}
        content.update(_common_keys(label_values, names, params, params_hash))
        _write_datalist(tmp_dir, content)
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / DATALIST


def load_datalist(path: Path) -> dict:
    """Read a prepared ``datalist.json``; item paths become absolute. One-line DatasetError when malformed."""
    path = Path(path)
    if path.is_dir():
        path = path / DATALIST
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist; prepare the dataset first") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a readable JSON datalist ({exc})") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    missing = [k for k in ("training", "test", "label_values", "roi_size") if k not in content]
    if missing:
        raise DatasetError(f"{path} lacks the keys {missing}")
    for split in _SPLITS:
        items = content.setdefault(split, [])
        if not isinstance(items, list):
            raise DatasetError(f"{path}: '{split}' must be a list")
        ids = set()
        for item in items:
            keys = ("image", "label", "subject", "id")
            if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in keys):
                raise DatasetError(f"{path}: every '{split}' item needs string 'image', 'label', 'subject' and 'id'")
            if item["id"] in ids:
                raise DatasetError(f"{path}: id {item['id']!r} appears twice in '{split}'")
            ids.add(item["id"])
            for key in ("image", "label"):
                item[key] = _resolve_inside(path.parent, item[key], path)
    return content


def datalist_spacing(datalist_path: Path | str) -> float | None:
    """The voxel spacing the prepared data really have (the datalist's ``spacing_mm``): what a checkpoint records,
    so ``deepsim register`` resamples to the grid the network was trained on, whatever a profile asked for."""
    value = load_datalist(Path(datalist_path)).get("spacing_mm")
    return None if value is None else float(value)


def label_values(datalist_path: Path | str) -> list[int]:
    """The dataset's label values (the prepared datalist's ``label_values``), e.g. for NCC+sup's one-hot maps."""
    return [int(v) for v in load_datalist(Path(datalist_path))["label_values"]]
