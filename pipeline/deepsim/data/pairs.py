"""Torch datasets over a prepared datalist: single subjects (feature pretraining) and image pairs (registration).

The preprocessed volumes are small (80×96×80 at 2 mm), so each dataset reads its split once into memory.
Images are float32 MetaTensors carrying their affine; labels are int64 MetaTensors on the same grid. A
default ``torch.utils.data.DataLoader`` (or MONAI's ``list_data_collate``) batches the items.
"""

from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from deepsim.data.datasets import DATALIST, _publish, load_datalist, write_volume
from deepsim.data.synthesis import sample_synthesis_params, synthesize_t1
from deepsim.errors import DatasetError, first_line
from deepsim.grid_check import check_affine
from deepsim.io import make_staging_dir

__all__ = ["PairDataset", "SubjectImages", "make_toy_dataset"]


def _read(path: str, dtype: torch.dtype) -> MetaTensor:
    try:
        img = nib.load(path)
        array = np.asarray(img.dataobj)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist; prepare the dataset again") from None
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable image ({type(exc).__name__}: {first_line(exc)})") from None
    check_affine(path, img.affine, array.shape)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)[None]
    return MetaTensor(tensor, affine=torch.as_tensor(img.affine, dtype=torch.float64), meta={"filename_or_obj": path})


class SubjectImages(Dataset):
    """Items ``{"image": (1, *S) float32, "label": (1, *S) int64, "id", "subject"}`` of one split (S 3D or 2D).

    ``device`` (e.g. ``"cuda"``): keep the images there as plain tensors, so a training step copies nothing from
    the host (a 1 mm brain is 27 MB; the 1 mm training split fits in a few GB of GPU memory). ``labels=False``
    skips the label maps (registration training with an image-only loss never reads them).
    """

    def __init__(self, datalist_path: Path | str, split: str = "training", device: str | torch.device | None = None,
                 labels: bool = True) -> None:
        #: the loaded datalist (paths resolved), kept for readers of its other keys (e.g. PairDataset's "pairs")
        self.datalist = datalist = load_datalist(Path(datalist_path))
        if split not in ("training", "validation", "test"):
            raise DatasetError(f"split must be 'training', 'validation' or 'test', got {split!r}")
        self.items = datalist[split]
        if not self.items:
            raise DatasetError(f"{datalist_path} has no '{split}' items")
        self.label_values: list[int] = [int(v) for v in datalist["label_values"]]
        self.images = [_read(it["image"], torch.float32) for it in self.items]
        # int16 in memory (a quarter of int64); items are widened on access
        self.labels = [_read(it["label"], torch.int16) for it in self.items] if labels else None
        if device is not None and torch.device(device).type != "cpu":
            self.images = [img.as_tensor().to(device) for img in self.images]
            self.labels = [lab.as_tensor().to(device) for lab in self.labels] if self.labels is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        item = {"image": self.images[index].clone(), "id": it["id"], "subject": it["subject"]}
        if self.labels is not None:
            item["label"] = self.labels[index].long()
        return item


class PairDataset(Dataset):
    """Ordered (fixed, moving) pairs of one split, never two images of the same subject when
    ``cross_subject_only`` (otherwise never the same image twice).

    If the datalist lists the split's pairs explicitly — ``"pairs": {"<split>": [[fixed_id, moving_id], ...]}``,
    as the cells time-lapse does with its frame pairs ``(t, t + k)`` — exactly those pairs are used (and
    ``cross_subject_only`` does not apply); otherwise every ordered pair of the rule above is a candidate.

    ``num_pairs=None`` enumerates every candidate pair (the natural choice for "validation" and "test");
    an integer gives that many pairs drawn with replacement, pair ``i`` from ``(seed, i)`` alone, so a resumed
    run sees the same pairs. Items: ``fixed``, ``moving`` (1, *S) float32 MetaTensors with affines (S is
    (D, H, W) or (H, W)), ``fixed_label``, ``moving_label`` (1, *S) int64 (unless ``labels=False``), and
    ``fixed_id``, ``moving_id``, ``pair_id`` strings. ``device``: see :class:`SubjectImages` (plain tensors there).
    """

    def __init__(
        self,
        datalist_path: Path | str,
        split: str = "training",
        num_pairs: int | None = None,
        seed: int = 0,
        cross_subject_only: bool = True,
        device: str | torch.device | None = None,
        labels: bool = True,
    ) -> None:
        self.subjects = SubjectImages(datalist_path, split, device=device, labels=labels)
        self.seed, self.num_pairs, self.cross_subject_only = int(seed), num_pairs, cross_subject_only
        if num_pairs is not None and num_pairs < 1:
            raise DatasetError(f"num_pairs must be ≥ 1 or None, got {num_pairs}")
        #: the datalist's explicit (fixed, moving) index pairs of this split, or None
        self.listed_pairs = _listed_pairs(self.subjects.datalist, split, self.subjects.items, datalist_path)
        if self.listed_pairs is not None:
            self.pairs = self.listed_pairs if num_pairs is None else None
            return
        subj = [it["subject"] for it in self.subjects.items]
        self._partners = [
            [j for j in range(len(subj)) if j != i and (not cross_subject_only or subj[j] != subj[i])]
            for i in range(len(subj))
        ]
        self._fixed_with_partner = [i for i, p in enumerate(self._partners) if p]
        if not self._fixed_with_partner:
            raise DatasetError(f"{datalist_path}: '{split}' has no two different subjects to pair")
        if num_pairs is None:
            self.pairs = [(i, j) for i, j in permutations(range(len(subj)), 2) if j in self._partners[i]]
        else:
            self.pairs = None

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else int(self.num_pairs)

    def pair_indices(self, index: int) -> tuple[int, int]:
        """(fixed, moving) subject indices of pair ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range 0..{len(self) - 1}")
        if self.pairs is not None:
            return self.pairs[index]
        rng = np.random.default_rng([self.seed, index])
        if self.listed_pairs is not None:
            return self.listed_pairs[int(rng.integers(len(self.listed_pairs)))]
        fixed = self._fixed_with_partner[int(rng.integers(len(self._fixed_with_partner)))]
        partners = self._partners[fixed]
        return fixed, partners[int(rng.integers(len(partners)))]

    def __getitem__(self, index: int) -> dict:
        f, m = self.pair_indices(index)
        fixed, moving = self.subjects[f], self.subjects[m]
        item = {"fixed": fixed["image"], "moving": moving["image"], "fixed_id": fixed["id"],
                "moving_id": moving["id"], "pair_id": f"{fixed['id']}__{moving['id']}"}
        if "label" in fixed:
            item.update(fixed_label=fixed["label"], moving_label=moving["label"])
        return item


def _listed_pairs(datalist: dict, split: str, items: list[dict], source) -> list[tuple[int, int]] | None:
    """The datalist's ``pairs[split]`` as (fixed, moving) item indices; None when the datalist lists none."""
    listed = datalist.get("pairs")
    if listed is None or (isinstance(listed, dict) and split not in listed):
        return None
    if not isinstance(listed, dict) or not isinstance(listed[split], list):
        raise DatasetError(f"{source}: 'pairs' must map a split to a list of [fixed_id, moving_id]")
    index = {it["id"]: i for i, it in enumerate(items)}
    pairs = []
    for pair in listed[split]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(p in index for p in pair)):
            raise DatasetError(f"{source}: pair {pair!r} of '{split}' is not two ids of '{split}' items")
        if pair[0] == pair[1]:
            raise DatasetError(f"{source}: pair {pair!r} of '{split}' pairs an image with itself")
        pairs.append((index[pair[0]], index[pair[1]]))
    if not pairs:
        raise DatasetError(f"{source}: 'pairs' lists no '{split}' pairs")
    return pairs


def _toy_labels(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """An ellipsoidal 'brain' with a 2-voxel 'cortex' ring split into 4 labels and 2 inner 'nuclei' (labels 5, 6)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    radii = np.array(shape) * rng.uniform(0.33, 0.42, 3)
    centre = rng.normal(0, 1.0, 3)
    r = np.sqrt((((grid - centre.reshape(3, 1, 1, 1)) / radii.reshape(3, 1, 1, 1)) ** 2).sum(0))
    labels = np.zeros(shape, dtype=np.int16)
    ring = (r <= 1.0) & (r > 1.0 - 2.5 / radii.min())
    quadrant = (grid[0] > centre[0]).astype(int) + 2 * (grid[1] > centre[1]).astype(int)
    labels[ring] = 1 + quadrant[ring]
    for value, side in ((5, -1), (6, 1)):
        c = centre + np.array([side * radii[0] * 0.35, rng.normal(0, 1), rng.normal(0, 1)])
        blob = np.sqrt((((grid - c.reshape(3, 1, 1, 1)) / (radii.reshape(3, 1, 1, 1) * 0.25)) ** 2).sum(0)) <= 1
        labels[blob] = value
    return labels


def make_toy_dataset(out_dir: Path, shape: tuple[int, int, int] = (32, 32, 32), n_subjects: int = 4, seed: int = 0) -> Path:
    """Write a tiny synthetic dataset (the "quick profile") in the prepared layout; returns its ``datalist.json``.

    Subjects are random ellipsoids with a labelled rim (1–4) and two nuclei (5, 6) on a 2 mm RAS grid of
    ``shape``, with synthesised images in [0, 1]. Split by subject: ``max(2, n_subjects // 4)`` test subjects;
    the rest train, with two contrast variants each; validation is one more variant of each training subject
    (not held out). ``n_subjects`` ≥ 4. Fast (< 1 s at 32³).
    """
    out_dir = Path(out_dir)
    shape = tuple(int(n) for n in shape)
    if n_subjects < 4 or len(shape) != 3:
        raise DatasetError(f"make_toy_dataset needs n_subjects ≥ 4 and a 3D shape, got {n_subjects}, {shape}")
    spacing = 2.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2
    rng = np.random.default_rng(seed)
    n_test = max(2, n_subjects // 4)
    subjects = [f"toy{i:02d}" for i in range(n_subjects)]
    roles = {s: ("test" if i >= n_subjects - n_test else "training") for i, s in enumerate(subjects)}
    tmp_dir = make_staging_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    content: dict = {"training": [], "validation": [], "test": []}
    for s in subjects:
        labels = _toy_labels(shape, rng)
        variants = [("training", "a"), ("training", "b"), ("validation", "val")] if roles[s] == "training" else [("test", "v0")]
        for split, tag in variants:
            params = sample_synthesis_params(range(1, 7), int(rng.integers(2**31 - 1)), subcortical_labels={5, 6})
            image = synthesize_t1(labels, (spacing,) * 3, params)
            lo, hi = np.percentile(image, [0.5, 99.5])
            image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
            sid = f"{s}_{tag}"
            write_volume(image, affine, tmp_dir / f"{sid}_image.nii.gz", is_label=False)
            write_volume(labels, affine, tmp_dir / f"{sid}_label.nii.gz", is_label=True)
            content[split].append({"image": f"{sid}_image.nii.gz", "label": f"{sid}_label.nii.gz", "subject": s, "id": sid})
    params = {"kind": "toy", "shape": list(shape), "n_subjects": n_subjects, "seed": seed}
    content.update({
        "label_values": list(range(7)), "label_names": {str(v): ("background" if v == 0 else f"toy{v}") for v in range(7)},
        "spacing_mm": spacing, "roi_size": list(shape), "seed": seed, "params": params,
    })  # fmt: skip
    (tmp_dir / DATALIST).write_text(json.dumps(content, indent=1))
    _publish(tmp_dir, out_dir)
    return out_dir / DATALIST
