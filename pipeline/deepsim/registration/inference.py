"""Register two preprocessed volumes with a trained network and write the results as NIfTI files.

Inputs must already live on the model's grid (as written by the preprocessing stage: same shape, RAS, training
spacing). Outputs: ``warped.nii.gz`` (moving resampled onto the fixed grid, fixed affine), ``ddf_mm.nii.gz``
(displacement in world millimetres, LPS components as ITK/ANTs read them), and ``warped_label.nii.gz`` when a moving label map is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepsim.engine.checkpoints import load_network
from deepsim.errors import DatasetError
from deepsim.io import load_displacement, load_volume, save_displacement, save_volume
from deepsim.spatial import ddf_voxel_to_world, ddf_world_to_voxel, warp_image, warp_labels

__all__ = ["register_files", "apply_field"]


@torch.no_grad()
def apply_field(field: str | Path, image: str | Path, out: str | Path, label: bool = False) -> Path:
    """Warp ``image`` with a saved displacement field (``deepsim warp``) and write it on the field's grid.

    ``image`` must lie on the field's grid (same shape and affine, to 1e-4 mm), as the moving image does after
    registration here. Images are resampled linearly; with ``label=True`` by nearest neighbour, label values kept.
    """
    ddf_mm, affine = load_displacement(field)
    ndim = ddf_mm.shape[0]
    array, image_affine = load_volume(image, ndim)
    if array.shape != ddf_mm.shape[1:] or not np.allclose(image_affine, affine, atol=1e-4):
        raise DatasetError(f"{image}: grid {array.shape} with affine {np.round(image_affine, 3).tolist()} is not the "
                           f"field's grid {ddf_mm.shape[1:]} {np.round(affine, 3).tolist()}")
    ddf = ddf_world_to_voxel(torch.as_tensor(ddf_mm)[None], torch.as_tensor(affine))
    if label:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise DatasetError(f"{image}: --label given but the image has non-integer values")
        warped = warp_labels(torch.as_tensor(array.astype(np.int64))[None, None], ddf)[0, 0].numpy().astype(np.int32)
    else:
        warped = warp_image(torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None], ddf)[0, 0].numpy()
    return save_volume(out, warped, affine)


@torch.no_grad()
def register_files(checkpoint: str | Path, fixed: str | Path, moving: str | Path, out_dir: str | Path,
                   moving_label: str | Path | None = None, spacing_mm: float | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Path]:
    """Register ``moving`` to ``fixed``; return the written paths by name."""
    network = load_network(checkpoint, map_location=device).to(device).eval()
    ndim = int(getattr(network, "spatial_dims", 3))  # 2D networks register 2D images
    fixed_arr, fixed_affine = load_volume(fixed, ndim)
    moving_arr, _ = load_volume(moving, ndim)
    if fixed_arr.shape != moving_arr.shape:
        raise DatasetError(f"{moving}: shape {moving_arr.shape} differs from fixed {fixed_arr.shape}; "
                           "register files written by the preprocessing stage")
    if spacing_mm is not None:
        spacing = np.sqrt((fixed_affine[:ndim, :ndim] ** 2).sum(axis=0))
        if not np.allclose(spacing, spacing_mm, atol=1e-3):
            raise DatasetError(f"{fixed}: voxel spacing {spacing.round(3).tolist()} mm, the model expects {spacing_mm} mm")
    to_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None].to(device)  # noqa: E731
    f, m = to_tensor(fixed_arr), to_tensor(moving_arr)
    try:
        ddf = network(m, f)
    except ValueError as exc:
        raise DatasetError(f"{fixed}: {exc}") from exc
    out_dir = Path(out_dir)
    written = {"warped": save_volume(out_dir / "warped.nii.gz", warp_image(m, ddf)[0, 0].cpu().numpy(), fixed_affine)}
    ddf_mm = ddf_voxel_to_world(ddf.cpu(), torch.as_tensor(fixed_affine))[0].numpy()
    written["ddf_mm"] = save_displacement(out_dir / "ddf_mm.nii.gz", ddf_mm, fixed_affine)
    if moving_label:
        labels, _ = load_volume(moving_label, ndim)
        lab = torch.as_tensor(labels.astype(np.int64))[None, None].to(device)
        written["warped_label"] = save_volume(out_dir / "warped_label.nii.gz",
                                              warp_labels(lab, ddf)[0, 0].cpu().numpy().astype(np.int32), fixed_affine)
    return written
