"""One subject's derivatives of a cohort registration: their BIDS names, their content, and how they are written.

Names follow fMRIPrep's (BIDS derivatives, plus the from-/to-/mode- entities of the transforms extension fMRIPrep
has used for years), for ``<prefix>`` = ``sub-X[_ses-Y]`` and ``<tpl>`` the template's ``space-`` label:

- ``<prefix>_space-<tpl>_desc-preproc_T1w.nii.gz``: the T1w image resampled into the template (its own intensities,
  linear, read once from its own voxels through the whole transform);
- ``<prefix>_from-T1w_to-<tpl>_mode-image_xfm.nii.gz``: the transform that resamples a T1w-space image into the
  template, as ITK/ANTs apply it: a displacement field on the template grid, mm, LPS components (template point x
  reads the T1w image at x + d(x)), the affine stage composed in;
- ``<prefix>_from-<tpl>_to-T1w_mode-image_xfm.nii.gz``: the inverse, on the T1w grid (what brings template-space
  images, e.g. the atlas, into the subject);
- ``<prefix>_desc-<atlas>_dseg.nii.gz``: the template's atlas in the subject's space (nearest neighbour), its label
  names in the dataset-level ``desc-<atlas>_dseg.tsv``;
- ``<prefix>_space-<tpl>_jacobian.nii.gz`` (+ ``.json``): the determinant of the Jacobian of the template -> T1w
  map at each template voxel (> 1: the subject's anatomy is larger there; the affine's scaling included), the input
  of tensor-based morphometry. BIDS has no suffix for it; ``jacobian`` is ours, so no query for T1w images
  (``_T1w``) or transforms (``_xfm``) returns it, and ``space-`` says on which grid it lies, as for every file here;
- ``<prefix>_registration.json``: settings, inputs, outputs, metrics and timings; written last, it marks the subject
  complete (a rerun skips it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepsim.data.bids import CohortItem
from deepsim.evaluation.dice import dice_per_label, mean_dice
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian
from deepsim.io import atomic_write, save_displacement, save_volume, smallest_label_dtype
from deepsim.geometry import Grid, sample_at
from deepsim.registration.inverse import inverse_residuals
from deepsim.registration.pipeline import Registration
from deepsim.spatial import ddf_world_to_voxel

__all__ = ["output_names", "marker_name", "SubjectOutputs", "compose_outputs", "write_outputs", "is_complete"]


def output_names(item: CohortItem, space: str, atlas: str | None) -> dict[str, str]:
    """File names (no folder) of one item's derivatives, by role."""
    p = item.prefix
    names = {"t1w": f"{p}_space-{space}_desc-preproc_T1w.nii.gz",
             "to_template": f"{p}_from-T1w_to-{space}_mode-image_xfm.nii.gz",
             "from_template": f"{p}_from-{space}_to-T1w_mode-image_xfm.nii.gz",
             "jacobian": f"{p}_space-{space}_jacobian.nii.gz",
             "jacobian_json": f"{p}_space-{space}_jacobian.json"}
    if atlas:
        names["dseg"] = f"{p}_desc-{atlas}_dseg.nii.gz"
    return names


def marker_name(item: CohortItem) -> str:
    """The per-item summary written last: its presence (with matching settings) marks the item complete."""
    return f"{item.prefix}_registration.json"


def is_complete(out_dir: Path, item: CohortItem, settings: dict) -> bool:
    """Whether ``item``'s outputs in ``out_dir`` are complete and were made with ``settings``."""
    marker = out_dir / item.folder / marker_name(item)
    try:
        summary = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if summary.get("settings") != settings:
        return False
    return all((out_dir / item.folder / name).is_file() for name in summary.get("outputs", {}).values())


@dataclass
class SubjectOutputs:
    """Arrays (CPU, numpy) to write, each with the grid it lies on, and the item's metrics."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray, object]]  # role -> (array, affine, header or None)
    metrics: dict[str, float | None]


@torch.no_grad()
def compose_outputs(registration: Registration, template_grid: Grid, atlas: torch.Tensor | None,
                    raw: torch.Tensor, subject_affine: np.ndarray, subject_header, labels: torch.Tensor | None,
                    similarity: Callable | None = None, template_norm: torch.Tensor | None = None,
                    subject_norm: torch.Tensor | None = None) -> SubjectOutputs:
    """Every derivative array of one registered subject (on the registration's device, returned on the CPU).

    ``raw``: the subject's intensities (*S'); ``labels``: its label map (*S') or None (Dice); ``atlas``: the
    template's labels (*T) or None; ``similarity`` with ``template_norm``/``subject_norm`` (the [0, 1] images):
    the similarity after registration, ``1 − similarity(warped, template)`` on the template grid."""
    ndim = template_grid.ndim
    x, target = registration.target_points(template_grid)
    forward_mm = target - x
    warped = sample_at(raw, subject_affine, target)
    det = jacobian_determinant(ddf_world_to_voxel(forward_mm[None], torch.as_tensor(template_grid.affine)))[0]
    mask = atlas > 0 if atlas is not None else None
    metrics: dict[str, float | None] = {"folding_pct": folding_percent(det, mask),
                                        "std_log_jacobian": std_log_jacobian(det, mask)}
    if similarity is not None:
        warped_norm = sample_at(subject_norm, subject_affine, target)
        metrics["similarity_after"] = 1.0 - float(similarity(warped_norm[None, None], template_norm[None, None]))

    # the inverse: subject point y -> template point v with T(v + u(v)) = y, i.e. v = z + w(z), z = T⁻¹(y), w the
    # optimiser's own inverse of u (the symmetric model fits it) or u inverted (Registration.inverse)
    subject_grid = Grid(tuple(int(n) for n in raw.shape), np.asarray(subject_affine, dtype=np.float64))
    y, v = registration.inverse_points(subject_grid)
    backward_mm = v - y
    metrics["inverse_residual_p99_vox"] = inverse_residuals(registration.ddf, registration.inverse())[1]

    arrays = {"t1w": (warped, template_grid.affine, None), "to_template": (forward_mm, template_grid.affine, None),
              "from_template": (backward_mm, subject_affine, subject_header),
              "jacobian": (det, template_grid.affine, None)}
    if atlas is not None:
        native = sample_at(atlas, template_grid.affine, v, mode="nearest")
        arrays["dseg"] = (native, subject_affine, subject_header)
        if labels is not None:
            warped_labels = sample_at(labels, subject_affine, target, mode="nearest")
            metrics["dice"] = mean_dice(dice_per_label(atlas, warped_labels))
            metrics["dice_native"] = mean_dice(dice_per_label(labels, native, labels=torch.unique(atlas[atlas > 0])))
    del x, target, y, v
    return SubjectOutputs({k: (a.cpu().numpy(), aff, hdr) for k, (a, aff, hdr) in arrays.items()}, metrics)


def _writer(role: str, path: Path, array: np.ndarray, affine: np.ndarray, header) -> Callable[[], Path]:
    if role in ("to_template", "from_template"):
        return lambda: save_displacement(path, array, affine, like=header)
    if role == "dseg":
        return lambda: save_volume(path, array.astype(smallest_label_dtype(array)), affine, like=header)
    return lambda: save_volume(path, array.astype(np.float32), affine, like=header)


def write_outputs(outputs: SubjectOutputs, names: dict[str, str], staging: Path, submit) -> dict[str, Path]:
    """Write every array into ``staging`` through ``submit(fn) -> Future`` (a thread pool: gzip compression releases
    the GIL) and the Jacobian's JSON sidecar; returns role -> staged path once all are written."""
    futures = {role: submit(_writer(role, staging / names[role], *spec)) for role, spec in outputs.arrays.items()}
    sidecar = {"Description": "Determinant of the Jacobian of the map from template to T1w space at each template "
                              "voxel (affine part included); > 1 where the subject is larger than the template",
               "Units": "arbitrary (volume ratio)"}
    staged = {"jacobian_json": atomic_write(staging / names["jacobian_json"],
                                            lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))}
    staged.update({role: future.result() for role, future in futures.items()})
    return staged


def publish(staged: dict[str, Path], destination: Path, marker: Path, summary: dict) -> None:
    """Move the staged files into ``destination`` (renames), then write ``marker`` last, atomically."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in staged.values():
        os.replace(path, destination / path.name)
    atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n"))
