"""Where a training stage's batches come from, chosen by one config value: ``pairs: fixed | synthetic``.

- ``"fixed"``: the prepared datalist's training images — :class:`~deepsim.data.pairs.PairDataset` pairs for
  registration, :class:`~deepsim.data.pairs.SubjectImages` for the feature nets — through a ``DataLoader``.
- ``"synthetic"``: an endless :class:`~deepsim.data.synthetic_stream.SyntheticStream` of
  :class:`~deepsim.data.synth.LabelPairSynth` pairs (or their images) drawn on the training device from a
  :class:`~deepsim.data.label_bank.LabelBank`: a bank file (``label_bank``: a path), or, by default, the training
  label maps of the prepared datalist itself (:func:`bank_from_datalist`), so users' own data work unchanged.

Synthetic labels are the bank's class indices ``0 .. K-1``, not the dataset's label values: losses and segmenters
that read labels take :func:`training_label_values` (the datalist's values for fixed data, ``range(K)`` for a bank).

Under ``torchrun`` rank ``r`` of ``W`` reads batches ``r, r + W, r + 2W, ...`` of the stream (:class:`RankStride`),
as :class:`~deepsim.engine.distributed.PassShuffledSampler` (handed in as ``sampler``) strides the fixed pairs. The
bundles' ``train_*.json`` wire these functions; nothing here knows about bundles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepsim.data.label_bank import CSF, EXTRA_LABEL_NAMES, WHITE_MATTER, LabelBank
from deepsim.data.synthetic_stream import SyntheticStream
from deepsim.errors import ConfigError, DatasetError

__all__ = ["PAIR_KINDS", "RankStride", "bank_from_datalist", "training_bank", "training_images",
           "training_label_values", "training_pairs"]

PAIR_KINDS = ("fixed", "synthetic")


def _check_kind(kind: str) -> str:
    if kind not in PAIR_KINDS:
        raise ConfigError(f"pairs must be one of {list(PAIR_KINDS)}, got {kind!r}")
    return kind


class RankStride:
    """Rank ``rank`` of ``world_size``'s share of a stream: its batches ``rank, rank + W, rank + 2W, ...``.

    The ``W`` ranks of one step together read ``W`` consecutive batches of the one-process stream. ``skip(n)``
    continues after this rank's first ``n`` batches (a resumed run, :mod:`deepsim.engine.resume`)."""

    def __init__(self, stream: SyntheticStream, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.stream, self.rank, self.world_size = stream, int(rank), int(world_size)

    def skip(self, batches: int) -> Iterator[dict[str, torch.Tensor]]:
        index = self.rank + self.world_size * int(batches)
        while True:
            yield self.stream.batch(index)
            index += self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.skip(0)


def _bank_items(datalist: Mapping[str, Any], source: Path) -> list[dict]:
    """The training items whose label maps are original (not an offline augmentation's deformed copy)."""
    items = [it for it in datalist["training"] if it.get("augmentation_seed") is None]
    if not items:
        raise DatasetError(f"{source}: no training item without augmentation to build a label bank from")
    return items


def _tissue_values(label_values: list[int]) -> tuple[int, int]:
    """The two values the tissue classes get: the bank builder's (WHITE_MATTER, CSF) when the dataset leaves
    them free, else the next two after its largest value."""
    if WHITE_MATTER not in label_values and CSF not in label_values:
        return WHITE_MATTER, CSF
    top = max(label_values)
    return top + 1, top + 2


def _lacks_white_matter(names: Mapping[str, str]) -> bool:
    return not any("white" in str(name).lower() for name in names.values())


def bank_from_datalist(datalist_path: str | Path, tissue_classes: bool | None = None) -> LabelBank:
    """A :class:`LabelBank` of the prepared datalist's training label maps, on their own grid, on the CPU.

    One map per distinct original training label map (offline-augmented copies and repeated maps, such as the
    contrast variants of one subject, are left out): for the embedded brains exactly the training donors' maps.
    ``tissue_classes`` adds white matter and CSF where :func:`deepsim.data.synthesis.synthesize_t1` paints them
    (:func:`deepsim.data.label_bank_build.with_tissue_classes`, as the bank builder does for the Desikan–Killiany
    maps); ``None`` (default): for 3D maps whose label names have no white matter, never for 2D maps. Class ``k``
    is the ``k``-th of the datalist's label values followed by the added ones.
    """
    from deepsim.data.datasets import load_datalist

    source = Path(datalist_path)
    datalist = load_datalist(source)
    values = sorted({int(v) for v in datalist["label_values"]} | {0})
    names = {str(k): str(v) for k, v in datalist.get("label_names", {}).items()}
    maps, affine, seen, sources = [], None, set(), []
    for item in _bank_items(datalist, source):
        array, item_affine = _read_label(item["label"])
        digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()
        if digest in seen:
            continue
        if maps and array.shape != maps[0].shape:
            raise DatasetError(f"{item['label']}: label map of shape {array.shape}, but the bank's grid is "
                               f"{maps[0].shape} (one grid for the training split)")
        seen.add(digest)
        maps.append(array)
        sources.append(f"{item['subject']}:{item['id']}")
        affine = item_affine if affine is None else affine
    stack = np.stack(maps)
    if tissue_classes is None:
        tissue_classes = stack.ndim == 4 and _lacks_white_matter(names)
    extra: tuple[int, ...] = ()
    if tissue_classes:
        stack, extra = _with_tissue(stack, affine, values), _tissue_values(values)
    unknown = sorted(set(np.unique(stack).tolist()) - set(values) - set(extra))
    if unknown:
        raise DatasetError(f"{source}: training label maps hold values {unknown[:5]} not in its label_values")
    class_values = values + list(extra)
    if len(class_values) > 256:
        raise DatasetError(f"{source}: {len(class_values)} label values; a label bank holds at most 256")
    lut = np.zeros(max(class_values) + 1, dtype=np.uint8)
    lut[class_values] = np.arange(len(class_values))
    extra_names = dict(zip(extra, (EXTRA_LABEL_NAMES[WHITE_MATTER], EXTRA_LABEL_NAMES[CSF])))
    class_names = tuple(names.get(str(v), extra_names.get(v, str(v))) for v in class_values)
    return LabelBank(torch.from_numpy(lut[stack]), np.asarray(affine, dtype=np.float64), tuple(class_values),
                     class_names, tuple(sources),
                     {"datalist": str(source), "tissue_classes": bool(tissue_classes)})


def _read_label(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(path)
        return np.asarray(image.dataobj).astype(np.int64), np.asarray(image.affine)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist; prepare the dataset again") from None


def _with_tissue(stack: np.ndarray, affine: np.ndarray, values: list[int]) -> np.ndarray:
    """Every map of ``stack`` (N, *S) with the two tissue classes of :func:`with_tissue_classes`."""
    from deepsim.data.label_bank_build import with_tissue_classes
    from deepsim.data.synthesis import brain_mask

    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    tissue = _tissue_values(values)
    return np.stack([with_tissue_classes(m, brain_mask(m, spacing), tissue).astype(np.int64) for m in stack])


def training_bank(kind: str, datalist_path: str | Path, path: str | Path | None = None,
                  device: torch.device | str = "cpu") -> LabelBank | None:
    """The label bank of ``pairs: synthetic`` on ``device``: the file ``path`` or, when None, the datalist's own
    training maps (:func:`bank_from_datalist`). ``kind`` "fixed": None (no bank is read)."""
    if _check_kind(kind) == "fixed":
        return None
    if path is None:
        return bank_from_datalist(datalist_path).to(device)
    bank = LabelBank.load(path)
    from deepsim.data.datasets import datalist_spacing

    spacing, ours = float(np.linalg.norm(bank.affine[:3, 0])), datalist_spacing(datalist_path)
    if ours is not None and not np.isclose(spacing, ours, rtol=1e-3):
        raise ConfigError(f"label_bank {path}: maps of {spacing:g} mm voxels, but the prepared data have {ours:g} mm "
                          "(build a bank at that spacing, or set label_bank to null for the datalist's own maps)")
    return bank.to(device)


def training_label_values(datalist_path: str | Path, bank: LabelBank | None = None) -> list[int]:
    """The label values the training batches carry: the bank's class indices ``0 .. K-1``, or without a bank the
    datalist's ``label_values``."""
    if bank is not None:
        return list(range(bank.num_classes))
    from deepsim.data.datasets import label_values

    return label_values(datalist_path)


def _synth(bank: LabelBank | None, options: Mapping[str, Any] | None, defaults: Mapping[str, Any] = {}):
    from deepsim.data.synth import LabelPairSynth

    if bank is None:
        raise ConfigError("pairs 'synthetic' needs a label bank (train#bank)")
    try:
        return LabelPairSynth(bank, **{**defaults, **dict(options or {})})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"synth_options: {exc}") from None


def _stream(synth, batch_size: int, seed: int, view: str, rank: int, world_size: int):
    stream = SyntheticStream(synth, batch_size=batch_size, seed=seed, device=synth.device, view=view)
    return stream if world_size == 1 else RankStride(stream, rank, world_size)


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, sampler: Callable[[Dataset], Sampler] | None):
    """A DataLoader in the main process; ``sampler(dataset)`` (a rank's shard) replaces the shuffling."""
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler(dataset), num_workers=0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def training_pairs(kind: str, datalist_path: str | Path, bank: LabelBank | None = None, *, num_pairs: int,
                   seed: int = 0, device: torch.device | str | None = None, labels: bool = True,
                   batch_size: int = 1, sampler: Callable[[Dataset], Sampler] | None = None, rank: int = 0,
                   world_size: int = 1, synth_options: Mapping[str, Any] | None = None):
    """Registration batches (``moving``, ``fixed`` (B, 1, *S) and, when ``labels`` or synthetic, their labels).

    ``fixed``: a DataLoader over ``num_pairs`` :class:`~deepsim.data.pairs.PairDataset` training pairs (pair ``i``
    from ``(seed, i)``), in order, or strided by ``sampler``. ``synthetic``: the endless stream of ``bank`` pairs
    (``synth_options``: :class:`~deepsim.data.synth.SynthOptions` fields), batch ``i`` from ``(seed, i)``.
    """
    if _check_kind(kind) == "fixed":
        from deepsim.data.pairs import PairDataset

        dataset = PairDataset(datalist_path, "training", num_pairs=num_pairs, seed=seed, device=device, labels=labels)
        return _loader(dataset, batch_size, False, sampler)
    return _stream(_synth(bank, synth_options), batch_size, seed, "pairs", rank, world_size)


def training_images(kind: str, datalist_path: str | Path, bank: LabelBank | None = None, *, seed: int = 0,
                    shuffle: bool = True, sampler: Callable[[Dataset], Sampler] | None = None, rank: int = 0,
                    world_size: int = 1, synth_options: Mapping[str, Any] | None = None):
    """Feature-net batches (``image``, ``label``). ``fixed``: the training subjects one by one, shuffled.
    ``synthetic``: both images of every stream pair, each its own random contrast; no flips by default (a
    segmenter's labels name left and right)."""
    if _check_kind(kind) == "fixed":
        from deepsim.data.pairs import SubjectImages

        return _loader(SubjectImages(datalist_path, "training"), 1, shuffle, sampler)
    synth = _synth(bank, synth_options, defaults={"flip_probability": 0.0})
    return _stream(synth, 1, seed, "images", rank, world_size)
