"""Register a user's own images with a trained model (``deepsim register``) and apply saved fields (``deepsim warp``).

Any input geometry is accepted: both images are resampled (linearly, in world space) onto a working grid in the
model's orientation (RAS) and spacing that covers the fixed image, padded to a size the network accepts; the
network's field is mapped back to the fixed image's own grid in millimetres. Outputs, all on the fixed grid with
the fixed image's affine (and header, for the warped image):

- ``warped.nii.gz``: the moving image resampled through the transform (its own intensities, linear, 0 outside);
- ``ddf_mm.nii.gz``: the whole transform (affine pre-alignment included) as a displacement field in mm with LPS
  components, as ITK's ``DisplacementFieldTransform`` and ANTs read it (point x of the fixed image maps to
  x + d(x) in the moving image);
- ``warped_label.nii.gz`` (with ``moving_label``): nearest neighbour, label values kept;
- ``jacobian_det.nii.gz``: determinant of the Jacobian of the transform;
- ``affine.tfm`` (with ``affine=True``): the pre-alignment alone, an ITK transform file;
- ``registration.json``: inputs, model, timings, and, with both label maps, Dice before/after, folding, std log|J|.

Files are written to a temporary folder first and moved into place at the end: a failure leaves no output. The
output folder and every target are checked before any work (:mod:`deepsim.output_folder`: never an input, a folder,
or a file deepsim did not write), and so is the geometry (:mod:`deepsim.registration.overlap`: images that do not
overlap, grids of absurd size).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from deepsim.errors import ConfigError, DatasetError
from deepsim.evaluation.dice import dice_per_label, mean_dice
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian
from deepsim.io import (has_shear, load_displacement, make_staging_dir, read_image, save_displacement, save_like,
                        save_volume, smallest_label_dtype)
from deepsim.output_folder import check_output_file, check_targets, publish_files
from deepsim.registration.geometry import (Grid, apply_affine, grid_points, linear_part, resample_onto, sample_at,
                                          working_grid)
from deepsim.registration.model import RegistrationModel, resolve_model
from deepsim.registration.overlap import check_extent, check_overlap
from deepsim.spatial import ddf_voxel_to_world, ddf_world_to_voxel

__all__ = ["register_files", "register_pairs", "apply_field", "NativeImage", "load_native", "normalise_intensity"]


@dataclass
class NativeImage:
    """An input image as read from disk: array (*S), voxel -> RAS affine, NIfTI header, and its path."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def grid(self) -> Grid:
        return Grid(tuple(int(n) for n in self.array.shape), self.affine)

    @property
    def ndim(self) -> int:
        return self.array.ndim


def load_native(path: str | Path, role: str) -> NativeImage:
    """Read a 2D or 3D NIfTI image; DatasetError names the file and the problem (``role``: for messages)."""
    array, affine, header = read_image(path)
    if array.ndim not in (2, 3):
        raise DatasetError(f"{path}: {role} has {array.ndim} dimensions {array.shape}; expected a 2D or 3D image")
    if min(array.shape) < 2:
        raise DatasetError(f"{path}: {role} has shape {array.shape}; every axis needs at least 2 voxels")
    if abs(np.linalg.det(linear_part(affine, array.ndim))) < 1e-9:
        raise DatasetError(f"{path}: {role}'s voxel axes do not span the world's first {array.ndim} axes (e.g. a "
                           "coronal 2D slice); 2D images must lie in the x-y plane of their affine")
    return NativeImage(Path(path), array, affine, header)


def normalise_intensity(image: NativeImage) -> np.ndarray:
    """Intensities mapped to [0, 1] as in training: percentiles 0.5 and 99.5 to 0 and 1, clipped.

    The same map as MONAI's ``ScaleIntensityRangePercentiles(0.5, 99.5, 0, 1, clip=True)`` the training data went
    through (tested equal), with the percentiles computed once instead of twice."""
    array = np.asarray(image.array, dtype=np.float32)
    lo, hi = np.percentile(array, [0.5, 99.5])
    if not hi > lo:
        raise DatasetError(f"{image.path}: the image is constant (or nearly: 99 % of voxels equal {lo:g}); "
                           "nothing to register")
    out = (array - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _check_label(label: NativeImage, image: NativeImage) -> np.ndarray:
    """The label map as int64, after checking it lies on its image's grid and holds integers."""
    if label.array.shape != image.array.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
        raise DatasetError(f"{label.path}: label map grid {label.array.shape} does not match its image "
                           f"{image.path} {image.array.shape} (shape and affine must agree)")
    values = _integer_labels(label.array, f"{label.path}: label map has non-integer values")
    if not values.any():
        raise DatasetError(f"{label.path}: the label map is empty (every voxel is 0); Dice needs labelled structures")
    return values


def _integer_labels(values: np.ndarray, message: str) -> np.ndarray:
    """``values`` as int64 (exact for every integer type up to int64 and uint64 below 2**63); DatasetError(``message``)
    if a float map holds non-integer values."""
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise DatasetError(message)
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        raise DatasetError(message.split(":")[0] + ": label values above 2**63 - 1 are not supported")
    return values.astype(np.int64)


def _check_pair(fixed: NativeImage, moving: NativeImage) -> None:
    if fixed.ndim != moving.ndim:
        raise DatasetError(f"{moving.path}: moving image is {moving.ndim}D but the fixed image {fixed.path} is "
                           f"{fixed.ndim}D")


def _check_model(fixed: NativeImage, model: RegistrationModel) -> None:
    if fixed.ndim != model.spatial_dims:
        raise DatasetError(f"{fixed.path}: a {fixed.ndim}D image, but the model {model.checkpoint} registers "
                           f"{model.spatial_dims}D images")


def _estimate_affine(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                     fixed_path: Path, moving_path: Path):
    """(4x4 RAS world -> world matrix mapping fixed points into the moving image, the SimpleITK transform)."""
    from deepsim.data.alignment import estimate_affine, to_sitk

    if fixed.ndim != 3:
        raise ConfigError("--affine supports 3D images only")
    try:
        transform = estimate_affine(to_sitk(fixed, fixed_affine), to_sitk(moving, moving_affine))
    except RuntimeError as exc:  # SimpleITK reports every failure as RuntimeError with a multi-line ITK message
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "ITK ERROR" in line), lines[-1] if lines else "RuntimeError")
        raise DatasetError(f"{fixed_path}: affine pre-alignment with {moving_path} failed in SimpleITK "
                           f"({detail[:160]})") from exc
    # ITK maps LPS points: y = A (x - c) + c + t. Sample it on the unit points to read the matrix, then go to RAS.
    lps = np.eye(4)
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        lps[:3, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - origin
    lps[:3, 3] = origin
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip, transform


def _instance_objective(model: RegistrationModel, device: torch.device):
    from deepsim.registration.objective import build_objective

    if model.similarity is None or model.regularization_weight is None:
        raise ConfigError(f"{model.checkpoint}: the checkpoint does not record its loss; --iterations needs it")
    try:
        return build_objective(model.similarity, model.regularization_weight, spatial_dims=model.spatial_dims,
                               models_dir=model.models_dir, device=device)
    except ValueError as exc:
        raise ConfigError(f"{model.checkpoint}: cannot build its loss {model.similarity!r} for --iterations "
                          f"({exc})") from exc


@torch.no_grad()
def _predict(model: RegistrationModel, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    return model.network(moving, fixed).float()


def _dice(fixed_label: np.ndarray, warped: np.ndarray) -> float:
    return mean_dice(dice_per_label(fixed_label, warped))


def register_files(
    fixed: str | Path,
    moving: str | Path,
    out_dir: str | Path,
    model: str | Path | RegistrationModel | None = None,
    fixed_label: str | Path | None = None,
    moving_label: str | Path | None = None,
    affine: bool = False,
    iterations: int = 0,
    learning_rate: float = 0.1,
    device: torch.device | str = "cpu",
    similarity: str | None = None,
    tracking_uri: str | None = None,
    spacing_mm: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Register ``moving`` to ``fixed`` and write the outputs listed in the module docstring into ``out_dir``.

    Returns the written paths by name (``warped``, ``ddf_mm``, ``jacobian_det``, ``report`` and, when given or
    used, ``warped_label``, ``affine``). ``model``: see :func:`deepsim.registration.model.resolve_model`;
    ``spacing_mm`` overrides the training spacing a checkpoint records (or supplies it for one that does not).
    ``overwrite``: write into a non-empty folder deepsim did not create, replacing files of the outputs' names
    (never an input).
    """
    started = time.perf_counter()
    device = torch.device(device)
    if iterations < 0:
        raise ConfigError(f"--iterations must be >= 0, got {iterations}")
    inputs = (fixed, moving, fixed_label, moving_label)
    check_targets(out_dir, _output_names(moving_label is not None, affine), inputs, "deepsim register", overwrite)
    # the two images are read and normalised side by side (gzip decompression and sorting release the GIL); the
    # fixed image's errors come first, as map returns its results in order
    with ThreadPoolExecutor(max_workers=2) as pool:
        fixed_img, moving_img = pool.map(load_native, (fixed, moving), ("fixed image", "moving image"))
        _check_pair(fixed_img, moving_img)
        fixed_lab = _check_label(load_native(fixed_label, "fixed label map"), fixed_img) if fixed_label else None
        moving_lab_img = load_native(moving_label, "moving label map") if moving_label else None
        moving_lab = _check_label(moving_lab_img, moving_img) if moving_label else None
        fixed_norm, moving_norm = pool.map(normalise_intensity, (fixed_img, moving_img))
    net = model if isinstance(model, RegistrationModel) else resolve_model(model, device, similarity, tracking_uri,
                                                                           spacing_mm)
    _check_model(fixed_img, net)
    check_extent(fixed_img.grid, net.spacing_mm, fixed_img.path)
    if not affine:
        check_overlap(fixed_img.grid, moving_img.grid, moving_img.path, fixed_img.path,
                      hint="; or pass --affine to align them first")
    objective = _instance_objective(net, device) if iterations else None
    timings: dict[str, float] = {}

    # 1. optional affine pre-alignment: T maps fixed world points into the moving image
    t0 = time.perf_counter()
    to_moving = np.eye(4)
    sitk_transform = None
    if affine:
        to_moving, sitk_transform = _estimate_affine(fixed_norm, fixed_img.affine, moving_norm, moving_img.affine,
                                                     fixed_img.path, moving_img.path)
    timings["affine_s"] = time.perf_counter() - t0

    # 2. both images on the working grid (model spacing, RAS, size the network accepts)
    t0 = time.perf_counter()
    grid = working_grid(fixed_img.grid, net.spacing_mm, net.size_multiple)
    # padding beyond the fixed field of view repeats its border (in both images, through the same points): zeros
    # there would meet moving content and bias the field near the border
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    f_work = resample_onto(as_tensor(fixed_norm), fixed_img.affine, grid, box=fixed_img.grid)[None, None]
    m_work = resample_onto(as_tensor(moving_norm), moving_img.affine, grid, box=fixed_img.grid,
                           transform=to_moving if affine else None)[None, None]
    timings["resample_s"] = time.perf_counter() - t0

    # 3. the network's field, optionally refined on this pair
    t0 = time.perf_counter()
    ddf = _predict(net, m_work, f_work)
    timings["network_s"] = time.perf_counter() - t0
    losses: list[float] = []
    if iterations:
        from deepsim.registration.instance import refine_field

        t0 = time.perf_counter()
        with torch.enable_grad():
            ddf, losses = refine_field(objective, m_work, f_work, ddf, iterations, learning_rate, progress)
        timings["instance_optimisation_s"] = time.perf_counter() - t0

    # 4. the whole transform on the fixed image's own grid: x -> T(x + u(x)), u interpolated from the working grid
    t0 = time.perf_counter()
    with torch.no_grad():
        # float32 points: 2e-5 mm resolution over 300 mm, half the time and memory of float64 at 1 mm
        u_mm = ddf_voxel_to_world(ddf.float(), torch.as_tensor(grid.affine))[0]
        x = grid_points(fixed_img.grid, device, torch.float32)
        target = x + resample_onto(u_mm, grid.affine, fixed_img.grid)
        if affine:
            target = apply_affine(to_moving, target)
        ddf_fixed_mm = target - x
        warped = sample_at(as_tensor(moving_img.array.astype(np.float32)), moving_img.affine, target)
        ddf_fixed_vox = ddf_world_to_voxel(ddf_fixed_mm[None], torch.as_tensor(fixed_img.affine))
        det = jacobian_determinant(ddf_fixed_vox)[0]
        warped_lab = None
        if moving_lab is not None:
            warped_lab = sample_at(as_tensor(moving_lab), moving_img.affine, target, mode="nearest").cpu().numpy()
    timings["compose_s"] = time.perf_counter() - t0
    check_overlap(target, moving_img.grid, moving_img.path, fixed_img.path, warn=affine)
    if has_shear(fixed_img.affine, fixed_img.ndim):
        print(f"deepsim: warning: {fixed_img.path} has sheared voxel axes, which ITK cannot represent: "
              "ddf_mm.nii.gz is exact for nibabel and deepsim warp, but SimpleITK/ANTs refuse it", file=sys.stderr)

    report: dict = {
        "fixed": str(fixed_img.path), "moving": str(moving_img.path),
        "fixed_label": str(fixed_label) if fixed_label else None,
        "moving_label": str(moving_label) if moving_label else None,
        "model": str(net.checkpoint), "similarity": net.similarity, "regularization_weight": net.regularization_weight,
        "model_spacing_mm": net.spacing_mm, "working_grid": list(grid.shape), "device": str(device),
        "affine_prealignment": bool(affine), "affine_ras": to_moving.tolist() if affine else None,
        "iterations": iterations, "instance_losses": [losses[0], losses[-1]] if losses else None,
        "ddf_mm_itk_readable": not has_shear(fixed_img.affine, fixed_img.ndim),
    }
    mask = torch.as_tensor(fixed_lab > 0) if fixed_lab is not None else None
    if mask is not None and not bool(mask.any()):
        mask = None
    report["folding_pct"] = folding_percent(det.cpu(), mask)
    report["std_log_jacobian"] = std_log_jacobian(det.cpu(), mask)
    report["jacobian_mask"] = "fixed label > 0" if mask is not None else "all voxels"
    if fixed_lab is not None and moving_lab is not None:
        with torch.no_grad():
            before = sample_at(as_tensor(moving_lab), moving_img.affine, x, mode="nearest").cpu().numpy()
            report["dice_before"] = _dice(fixed_lab, before)
            if affine:
                after_affine = sample_at(as_tensor(moving_lab), moving_img.affine, apply_affine(to_moving, x),
                                         mode="nearest").cpu().numpy()
                report["dice_after_affine"] = _dice(fixed_lab, after_affine)
            report["dice_after"] = _dice(fixed_lab, warped_lab)

    out_dir = Path(out_dir)
    staging = make_staging_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        writers = {
            "warped": lambda: save_like(staging / "warped.nii.gz", warped.cpu().numpy().astype(np.float32),
                                        fixed_img.header, fixed_img.affine),
            "ddf_mm": lambda: save_displacement(staging / "ddf_mm.nii.gz", ddf_fixed_mm.cpu().numpy(),
                                                fixed_img.affine, like=fixed_img.header),
            "jacobian_det": lambda: save_volume(staging / "jacobian_det.nii.gz", det.cpu().numpy(), fixed_img.affine,
                                                like=fixed_img.header),
        }
        if warped_lab is not None:
            writers["warped_label"] = lambda: save_volume(staging / "warped_label.nii.gz",
                                                          _label_dtype(warped_lab, moving_lab_img.array.dtype),
                                                          fixed_img.affine, like=fixed_img.header)
        # two writers at a time: gzip compression (ISA-L) releases the GIL, so the files compress in parallel
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(write) for name, write in writers.items()}
            written = {name: future.result() for name, future in futures.items()}
        if sitk_transform is not None:
            import SimpleITK as sitk

            sitk.WriteTransform(sitk_transform, str(staging / "affine.tfm"))
            written["affine"] = staging / "affine.tfm"
        timings["total_s"] = time.perf_counter() - started
        report["timings"] = {k: round(v, 3) for k, v in timings.items()}
        report["outputs"] = {name: path.name for name, path in written.items()}
        (staging / "registration.json").write_text(json.dumps(report, indent=2) + "\n")
        written["report"] = staging / "registration.json"
        return publish_files(written, out_dir, inputs, "deepsim register", overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_PAIR_COLUMNS = ("fixed", "moving", "fixed_label", "moving_label", "name")


def read_pairs(csv_path: str | Path) -> list[dict]:
    """Rows of a pairs CSV (columns ``fixed``, ``moving``, optional ``fixed_label``, ``moving_label``, ``name``);
    relative paths are relative to the CSV's folder. Every file is checked to exist before any work starts."""
    import csv

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: file not found")
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: not a readable CSV file ({exc})") from exc
    missing, unknown = {"fixed", "moving"} - set(columns), set(columns) - set(_PAIR_COLUMNS)
    if missing or unknown:
        raise DatasetError(f"{csv_path}: columns must be fixed, moving[, fixed_label, moving_label, name]; "
                           f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    if not rows:
        raise DatasetError(f"{csv_path}: lists no pairs")
    pairs, names = [], set()
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header = line 1)
        pair = {"name": row.get("name") or f"pair_{i - 1:04d}"}
        if pair["name"] in names or "/" in pair["name"] or pair["name"] in (".", ".."):
            raise DatasetError(f"{csv_path}: line {i}: name {pair['name']!r} is repeated or not a folder name")
        names.add(pair["name"])
        for key in ("fixed", "moving", "fixed_label", "moving_label"):
            if not row.get(key):
                if key in ("fixed", "moving"):
                    raise DatasetError(f"{csv_path}: line {i}: no {key} image")
                continue
            path = Path(row[key]).expanduser()
            path = path if path.is_absolute() else csv_path.parent / path
            if not path.is_file():
                raise DatasetError(f"{csv_path}: line {i}: {key} {path} not found")
            pair[key] = path
        pairs.append(pair)
    return pairs


def register_pairs(csv_path: str | Path, out_dir: str | Path, model: str | Path | RegistrationModel | None = None,
                   device: torch.device | str = "cpu", similarity: str | None = None,
                   tracking_uri: str | None = None, spacing_mm: float | None = None, **options) -> list[dict]:
    """Register every pair of a CSV (see :func:`read_pairs`) with one loaded model, each into ``out_dir/<name>``
    (the outputs of :func:`register_files`), then write ``out_dir/registrations.csv`` (one row per pair: Dice,
    folding, std log|J|, seconds). Loading the model and Python's start-up are paid once, not per pair.

    ``options`` go to :func:`register_files` (``affine``, ``iterations``, ``learning_rate``, ``progress``,
    ``overwrite``).
    Each pair's folder is written atomically; a pair that fails stops the run with its error, and the folders of
    the pairs before it stay complete.
    """
    import pandas as pd

    from deepsim.io import atomic_write

    from deepsim.output_folder import own_output_folder

    pairs = read_pairs(csv_path)
    out_dir = Path(out_dir)
    check_targets(out_dir, ["registrations.csv"], [csv_path], "deepsim register", options.get("overwrite", False))
    net = model if isinstance(model, RegistrationModel) else resolve_model(model, device, similarity, tracking_uri,
                                                                           spacing_mm)
    rows = []
    with own_output_folder(out_dir, "deepsim register", options.get("overwrite", False)):
        for pair in pairs:
            started = time.perf_counter()
            written = register_files(pair["fixed"], pair["moving"], out_dir / pair["name"], model=net,
                                     fixed_label=pair.get("fixed_label"), moving_label=pair.get("moving_label"),
                                     device=device, **options)
            report = json.loads(written["report"].read_text())
            rows.append({"name": pair["name"], "fixed": str(pair["fixed"]), "moving": str(pair["moving"]),
                         **{k: report.get(k) for k in ("dice_before", "dice_after_affine", "dice_after",
                                                       "folding_pct", "std_log_jacobian")},
                         "seconds": time.perf_counter() - started})
        table = pd.DataFrame(rows)
        atomic_write(out_dir / "registrations.csv", lambda tmp: table.to_csv(tmp, index=False))
    return rows


def _label_dtype(labels: np.ndarray, source: np.dtype) -> np.ndarray:
    """Warped labels in the input label map's own integer type (uint32, int64, ... kept), or, for a label map stored
    as floats, the smallest of int16/int32/int64 that holds the values. Never a narrowing cast."""
    source = np.dtype(source)
    if np.issubdtype(source, np.integer) or source == bool:
        return labels.astype(source)
    return labels.astype(smallest_label_dtype(labels))


def _output_names(label: bool, affine: bool) -> list[str]:
    """File names ``register_files`` writes (module docstring)."""
    names = ["warped.nii.gz", "ddf_mm.nii.gz", "jacobian_det.nii.gz", "registration.json"]
    return names + ["warped_label.nii.gz"] * label + ["affine.tfm"] * affine


@torch.no_grad()
def apply_field(field: str | Path, image: str | Path, out: str | Path, label: bool = False,
                overwrite: bool = False) -> Path:
    """Warp ``image`` with a saved displacement field (``deepsim warp``); write it on the field's grid.

    The field maps each point x of its grid to x + d(x) in the moving image's world space, so ``image`` may lie on
    any grid (the moving image's own, typically): it is read at those world points, as ITK's ``Resample`` does.
    Images are resampled linearly (0 outside), with ``label=True`` by nearest neighbour, label values and their
    integer type kept. ``out`` is never one of the inputs; an existing file is replaced only with ``overwrite``.
    An image none of whose points the field reaches is refused (the result would be all 0).
    """
    check_output_file(out, (field, image), overwrite)
    ddf_mm, affine = load_displacement(field)
    ndim = ddf_mm.shape[0]
    img = load_native(image, "image")
    if img.ndim != ndim:
        raise DatasetError(f"{image}: a {img.ndim}D image, but the field {field} is {ndim}D")
    field_grid = Grid(tuple(int(n) for n in ddf_mm.shape[1:]), affine)
    target = grid_points(field_grid) + torch.as_tensor(ddf_mm, dtype=torch.float64)
    check_overlap(target, img.grid, image, field)
    if label:
        values = _integer_labels(img.array, f"{image}: --label given but the image has non-integer values")
        warped = sample_at(torch.as_tensor(values), img.affine, target, mode="nearest").numpy()
        return save_volume(out, _label_dtype(warped, img.array.dtype), affine)
    warped = sample_at(torch.as_tensor(np.asarray(img.array, dtype=np.float32)), img.affine, target).numpy()
    return save_volume(out, warped.astype(np.float32), affine)
