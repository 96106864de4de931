"""Build a :class:`~deepsim.data.label_bank.LabelBank` once, on the CPU, from the training donors (and fsaverage).

Sources, all brought onto the grid of ``prepare_embedded_brains(spacing_mm, alignment="affine")`` (the grid the
1 mm held-out pairs live on) with that function's own steps (:func:`deepsim.data.datasets.load_embedded_donors`,
:func:`~deepsim.data.datasets.align_donors`: an affine fit of a synthesised T1 to the reference donor's, then
one nearest-neighbour resampling):

- the **training** donors' Desikan–Killiany maps (9861, 12876, 14380 by default; the test donors 10021, 15496,
  15697 are refused), extended with the two classes the DK maps lack, decided as
  :func:`deepsim.data.synthesis.synthesize_t1` decides them (:func:`~deepsim.data.synthesis.brain_mask`):
  unlabelled voxels inside the brain → white matter, its sulcal shell and a 2 mm rim around it → CSF;
- optionally FreeSurfer's fsaverage ``aparc+aseg`` (:mod:`deepsim.data.fsaverage`, FreeSurfer licence, optional
  extra), whose own white-matter and CSF labels are used.

The affine fit is handed in (``aligner``), so this module stays below the registration layer; the command line
that wires :func:`deepsim.registration.affine.estimate_affine` is :mod:`deepsim.workflows.label_bank`::

    python -m deepsim.workflows.label_bank --spacing 1 --out bank_1mm.npz [--fsaverage]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from deepsim.data.datasets import (
    DEFAULT_TEST_DONORS,
    DEFAULT_TRAIN_DONORS,
    REFERENCE_DONOR,
    align_donors,
    load_embedded_donors,
    write_volume,
)
from deepsim.data.embedded import EMBEDDED_DONORS, dk_label_names
from deepsim.data.alignment import Aligner, resample_to_grid
from deepsim.data.fsaverage import fsaverage_aparc_aseg_path, freesurfer_to_dk_lut
from deepsim.data.label_bank import CSF, EXTRA_LABEL_NAMES, WHITE_MATTER, LabelBank
from deepsim.data.synthesis import brain_mask
from deepsim.data.transforms import Chain, default_roi_size, loading_transforms
from deepsim.errors import DatasetError

__all__ = ["with_tissue_classes", "load_fsaverage", "build_label_bank"]

_BRAINSTEM = 83  # in fsaverage only: the embedded donors' maps have no brainstem


def with_tissue_classes(labels: np.ndarray, masks: tuple[np.ndarray, np.ndarray],
                        values: tuple[int, int] = (WHITE_MATTER, CSF)) -> np.ndarray:
    """DK map (*S) + ``values[0]`` (WHITE_MATTER) where ``synthesize_t1`` paints white matter (brain, unlabelled,
    not CSF) + ``values[1]`` (CSF) where it paints CSF (``brain_mask``'s ``csf``). masks: ``brain_mask(labels,
    spacing)``. → int16 (*S)."""
    brain, csf = masks
    out = np.asarray(labels).astype(np.int16)
    out[brain & (out == 0) & ~csf] = values[0]
    out[csf & (np.asarray(labels) == 0)] = values[1]
    return out


def load_fsaverage() -> dict:
    """fsaverage as a donor-like item: ``label`` = its DK structures only (no brainstem: what the donors have, for
    the alignment), ``extended`` = DK + WHITE_MATTER + CSF + brainstem, both RAS and cropped; ``masks``."""
    path = fsaverage_aparc_aseg_path()
    image = nib.load(str(path))
    freesurfer = np.asarray(image.dataobj)
    values, inverse = np.unique(freesurfer, return_inverse=True)
    lut = freesurfer_to_dk_lut(values, str(path))
    extended = np.asarray([lut[int(v)] for v in values], dtype=np.int16)[inverse].reshape(freesurfer.shape)
    dk = np.where(np.isin(extended, [WHITE_MATTER, CSF, _BRAINSTEM]), 0, extended).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:  # through the loaders every label map takes (RAS, crop)
        files = {"label": Path(tmp) / "dk.nii.gz", "extended": Path(tmp) / "extended.nii.gz"}
        for key, array in (("label", dk), ("extended", extended)):
            write_volume(torch.from_numpy(array), image.affine, files[key], is_label=True)
        item = Chain(loading_transforms(image_key="label", label_key="extended"))({k: str(v) for k, v in files.items()})
    spacing = np.linalg.norm(item["label"].affine.numpy()[:3, :3], axis=0)
    item["masks"] = brain_mask(item["label"][0].numpy(), spacing)
    return item


def build_label_bank(aligner: Aligner, spacing_mm: float = 1.0, roi_size: Sequence[int] | None = None,
                     donors: Sequence[str] = DEFAULT_TRAIN_DONORS, fsaverage: bool = False, seed: int = 0,
                     progress: bool = True) -> LabelBank:
    """Label maps of ``donors`` (+ fsaverage) on the affine-aligned grid of ``prepare_embedded_brains`` (same
    ``spacing_mm``, ``roi_size``, ``seed`` and ``aligner``: :func:`deepsim.registration.affine.estimate_affine`
    gives that grid), compact class indices, uint8, on the CPU."""
    donors = [str(d) for d in donors]
    leaked = sorted(set(donors) & set(DEFAULT_TEST_DONORS))
    if leaked:
        raise DatasetError(f"donors {leaked} are held-out test donors; the label bank is for training")
    unknown = sorted(set(donors) - set(EMBEDDED_DONORS))
    if unknown:
        raise DatasetError(f"unknown embedded donors {unknown}; available: {list(EMBEDDED_DONORS)}")
    if REFERENCE_DONOR not in donors:
        raise DatasetError(f"the grid is centred on donor {REFERENCE_DONOR}: keep it among the donors")
    roi = tuple(int(n) for n in (roi_size if roi_size is not None else default_roi_size(spacing_mm)))
    loaded = load_embedded_donors(donors, progress)
    for item in loaded.values():
        item["extended"] = with_tissue_classes(item["label"][0].numpy(), item["masks"])
    if fsaverage:
        loaded["fsaverage"] = load_fsaverage()
        loaded["fsaverage"]["extended"] = loaded["fsaverage"]["extended"][0].numpy().astype(np.int16)
    grid_affine, transforms = align_donors(loaded, REFERENCE_DONOR, float(spacing_mm), roi, seed, progress, aligner)
    maps = {name: resample_to_grid(item["extended"], item["label"].affine.numpy(), transforms[name], grid_affine,
                                   roi, is_label=True)
            for name, item in loaded.items()}  # fmt: skip
    values = sorted({int(v) for m in maps.values() for v in np.unique(m)} | {0})
    lut = np.zeros(max(values) + 1, dtype=np.uint8)
    lut[values] = np.arange(len(values))
    names = {**dk_label_names(), **EXTRA_LABEL_NAMES}
    order = [d for d in donors] + (["fsaverage"] if fsaverage else [])
    stack = np.stack([lut[maps[name]] for name in order])
    return LabelBank(
        torch.from_numpy(stack), grid_affine, tuple(values), tuple(names.get(v, str(v)) for v in values),
        tuple(f"donor:{d}" if d != "fsaverage" else "fsaverage" for d in order),
        {"spacing_mm": float(spacing_mm), "roi_size": list(roi), "seed": int(seed), "reference_donor": REFERENCE_DONOR,
         "grid": "prepare_embedded_brains(alignment='affine')"},
    )
