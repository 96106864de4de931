"""Register a user's own images with a trained model (``deepsim register``) and apply saved fields (``deepsim warp``).

The accurate path by default (:class:`deepsim.registration.pipeline.Registrar`): an affine stage in torch, then
the network's field on a working grid in the model's orientation (RAS) and spacing that covers the fixed image,
then instance optimisation of a diffeomorphic transform on the pair; each stage can be switched off
(``affine=False``, ``network=False``, ``iterations=0``: the network alone is ``affine=False, iterations=0``). Any
input geometry is accepted. The whole transform is mapped back to the fixed image's own grid in millimetres, and
the moving image is interpolated once, from its own voxels. Outputs, all on the fixed grid with the fixed image's
affine (and header, for the warped image):

- ``warped.nii.gz``: the moving image resampled through the transform (its own intensities, linear, 0 outside);
- ``ddf_mm.nii.gz``: the whole transform (affine pre-alignment included) as a displacement field in mm with LPS
  components, as ITK's ``DisplacementFieldTransform`` and ANTs read it (point x of the fixed image maps to
  x + d(x) in the moving image);
- ``ddf_mm_inverse.nii.gz``: the inverse transform, on the *moving* image's grid with the moving image's affine:
  point y of the moving image maps to y + d(y) in the fixed image (ITK ``DisplacementFieldTransform``, mm, LPS
  components), so ``deepsim warp --field ddf_mm_inverse.nii.gz`` brings the fixed image or its labels onto the
  moving image; its inverse consistency (‖φ⁻¹∘φ − id‖ on the working grid) is in ``registration.json``;
- ``warped_label.nii.gz`` (with ``moving_label``): nearest neighbour, label values kept;
- ``jacobian_det.nii.gz``: determinant of the Jacobian of the transform;
- ``affine.tfm`` (with the affine stage): the affine alone, an ITK transform file (SimpleITK, ANTs, Slicer read it);
- ``registration.json``: inputs, model, timings, the contrast decision, warnings, inverse consistency, and, with
  both label maps, Dice before/after, folding, std log|J|.

Which path runs depends on whether the two images share a contrast (``contrast``: ``"auto"`` measures it,
:mod:`deepsim.registration.checks`): one contrast, the NCC affine, the network and the model's loss; different
contrasts, the path of :data:`deepsim.registration.checks.PATHS` (mutual information affine, a contrast-free loss).
An option given explicitly (``affine_metric``, ``network``, ``loss``) always wins. A result that looks wrong — less
similar than the inputs, an implausible affine, a contrast declared ``same`` that measures as different — is
reported: one ``deepsim: warning:`` line each on stderr and the list ``"warnings"`` in ``registration.json``.

Files are written to a temporary folder first and moved into place at the end: a failure leaves no output. The
output folder and every target are checked before any work (:mod:`deepsim.output_folder`: never an input, a folder,
or a file deepsim did not write), and so is the geometry (:mod:`deepsim.registration.overlap`: images that do not
overlap, grids of absurd size).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from deepsim.errors import ConfigError, DatasetError
from deepsim.evaluation.dice import dice_per_label, mean_dice
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian
from deepsim.grid_check import MIN_AXIS_INDEPENDENCE, check_extent
from deepsim.losses import FEATURE_NET_OF
from deepsim.io import (has_shear, load_displacement, make_staging_dir, read_image, save_displacement, save_itk_affine,
                        save_like, save_volume, smallest_label_dtype)
from deepsim.output_folder import check_output_file, check_targets, publish_files
from deepsim.registration.affine import AffineRegistration
from deepsim.registration.checks import (PATHS, choose_contrast, orientation_warnings, report_warnings,
                                         result_warnings)
from deepsim.geometry import Grid, apply_affine, grid_points, sample_at
from deepsim.registration.instance import InstanceOptimisation, check_transform, instance_similarity, test_time_loss
from deepsim.registration.model import RegistrationModel, resolve_model
from deepsim.registration.overlap import WARN_OVERLAP, check_overlap
from deepsim.registration.pipeline import Registrar
from deepsim.spatial import ddf_world_to_voxel

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
    # read_image checked that the voxel axes are independent (grid_check); a 2D image's must also span x-y. The
    # test is scale-free: an absolute determinant threshold refused 3D micron images (0.5 µm voxels: det 1.25e-10)
    axes = np.asarray(affine, dtype=np.float64)[:3, :array.ndim]
    if array.ndim == 2 and abs(np.linalg.det(axes[:2])) / np.prod(np.linalg.norm(axes, axis=0)) < MIN_AXIS_INDEPENDENCE:
        raise DatasetError(f"{path}: {role}'s voxel axes do not span the world's x-y plane (e.g. a coronal 2D slice); "
                           "2D images must lie in the x-y plane of their affine")
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


def _instance_optimiser(net: RegistrationModel | None, loss: str | None, spatial_dims: int, iterations,
                        learning_rate: float | None, device: torch.device, transform: str | None = None
                        ) -> InstanceOptimisation | None:
    """The optimisation stage: ``loss`` (default: the model's own, else local NCC) over the pyramid levels of
    :class:`InstanceOptimisation` with ``iterations`` steps per level (one number for every level, or one each;
    None: its defaults), its ``transform`` model and ``learning_rate`` (None: its defaults). None when
    ``iterations`` is 0."""
    defaults = InstanceOptimisation.__dataclass_fields__
    if iterations is None:
        iterations = defaults["iterations"].default
    steps = [int(n) for n in ([iterations] if isinstance(iterations, (int, float)) else iterations)]
    if any(n < 0 for n in steps):
        raise ConfigError(f"--iterations must be >= 0, got {steps}")
    if not any(steps):
        if transform is not None:
            raise ConfigError(f"--transform {transform} names the instance optimisation's model, but --iterations 0 "
                              "turns the instance optimisation off; leave out one of them")
        return None
    levels = defaults["scales"].default
    if len(steps) == 1:
        steps = steps * len(levels)
    if len(steps) != len(levels):
        raise ConfigError(f"--iterations takes 1 or {len(levels)} numbers (one per level, shrink {levels}); "
                          f"got {steps}")
    name = loss or test_time_loss(net.similarity if net is not None else None)
    try:
        check_transform(transform, name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        similarity = instance_similarity(name, spatial_dims, net.models_dir if net is not None else None, device)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"instance optimisation with the loss {name!r}: {exc}") from exc
    return InstanceOptimisation(similarity, transform=transform, iterations=steps, loss_name=name,
                                learning_rate=learning_rate or defaults["learning_rate"].default)


def _dice(fixed_label: np.ndarray, warped: np.ndarray) -> float:
    return mean_dice(dice_per_label(fixed_label, warped))


def register_files(
    fixed: str | Path,
    moving: str | Path,
    out_dir: str | Path,
    model: str | Path | RegistrationModel | None = None,
    fixed_label: str | Path | None = None,
    moving_label: str | Path | None = None,
    affine: bool = True,
    iterations: int | Sequence[int] | None = None,
    learning_rate: float | None = None,
    device: torch.device | str = "cpu",
    similarity: str | None = None,
    tracking_uri: str | None = None,
    spacing_mm: float | None = None,
    progress: bool = True,
    network: bool | None = None,
    loss: str | None = None,
    affine_metric: str | None = None,
    overwrite: bool = False,
    contrast: str = "auto",
    transform: str | None = None,
) -> dict[str, Path]:
    """Register ``moving`` to ``fixed`` and write the outputs listed in the module docstring into ``out_dir``.

    Stages: ``affine`` (torch, ``affine_metric`` "ncc" or "mi"), ``network`` (the model's prediction), instance
    optimisation with ``iterations`` steps per pyramid level (0: none) of the ``transform`` model (``greedy``,
    ``symmetric``, ``svf``) on ``loss`` (``learning_rate`` in voxels); ``iterations``, ``transform`` and
    ``learning_rate`` at None: the defaults of :class:`~deepsim.registration.instance.InstanceOptimisation`.
    ``contrast`` (``auto``, ``same``, ``different``) picks the defaults of ``affine_metric``, ``network`` and
    ``loss`` left at None (:data:`deepsim.registration.checks.PATHS`; ``same``: NCC, the network, the model's own
    loss). Returns the written paths by name (``warped``, ``ddf_mm``, ``ddf_mm_inverse``, ``jacobian_det``,
    ``report`` and, when given or used, ``warped_label``, ``affine``). ``model``: see
    :func:`deepsim.registration.model.resolve_model`; ``spacing_mm`` overrides the training spacing a checkpoint
    records (or supplies it for one that does not). Without the network the optimisation runs on the fixed image's
    own grid (or at ``spacing_mm``). ``overwrite``: write into a non-empty folder deepsim did not create, replacing
    files of the outputs' names (never an input).
    """
    started = time.perf_counter()
    device = torch.device(device)
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
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    fixed_t, moving_t = as_tensor(fixed_norm), as_tensor(moving_norm)
    try:
        choice = choose_contrast(contrast, fixed_t, fixed_img.affine, moving_t, moving_img.affine)
    except ValueError as exc:
        raise ConfigError(f"--contrast: {exc}") from exc
    path = PATHS[choice.used]
    affine_metric = path.affine_metric if affine_metric is None else affine_metric
    network = path.network if network is None else network
    loss = path.loss if loss is None else loss
    warnings, orientation = orientation_warnings(fixed_t, fixed_img.affine, moving_t, moving_img.affine)
    if choice.requested == "same" and choice.detected == "different":
        warnings.append(f"--contrast same, but {moving_img.path} and {fixed_img.path} measure as different "
                        f"contrasts (rank correlation {choice.relation:.2f} inside the brain): NCC and the network "
                        "assume one contrast; leave --contrast at auto, or give different")
    net = None
    if network or model is not None or FEATURE_NET_OF.get(loss or ""):  # a DeepSim loss: the model's feature nets
        net = model if isinstance(model, RegistrationModel) else resolve_model(model, device, similarity,
                                                                               tracking_uri, spacing_mm)
        _check_model(fixed_img, net)
    working_spacing = net.spacing_mm if net is not None else spacing_mm
    if working_spacing is not None:
        check_extent(fixed_img.path, fixed_img.affine, fixed_img.array.shape, working_spacing)
    fov_warned = False  # a field-of-view warning already given: the coverage check would say the same again
    if not affine:
        fov_warned = check_overlap(fixed_img.grid, moving_img.grid, moving_img.path, fixed_img.path,
                                   hint="; or let the affine stage align them (leave out --no-affine / "
                                        "--network-only)") < WARN_OVERLAP
    if affine and affine_metric not in ("ncc", "mi"):
        raise ConfigError(f"--affine-metric must be ncc or mi, got {affine_metric!r}")
    optimiser = _instance_optimiser(net, loss, fixed_img.ndim, iterations, learning_rate, device, transform)
    registrar = Registrar(
        affine=AffineRegistration(metric=affine_metric) if affine else None,
        network=net.network if network else None,
        optimiser=optimiser,
        spacing_mm=working_spacing,
        size_multiple=net.size_multiple if network else 1,
    )
    result = registrar(fixed_t, fixed_img.affine, moving_t, moving_img.affine, progress=progress)
    timings = dict(result.timings)
    to_moving = result.matrix

    # the whole transform on the fixed image's own grid, x -> T(x + u(x)); the moving image read once through it
    t0 = time.perf_counter()
    with torch.no_grad():
        # float32 points: 2e-5 mm resolution over 300 mm, half the time and memory of float64 at 1 mm
        x, target = result.target_points(fixed_img.grid)
        ddf_fixed_mm = target - x
        warped = sample_at(as_tensor(moving_img.array.astype(np.float32)), moving_img.affine, target)
        ddf_fixed_vox = ddf_world_to_voxel(ddf_fixed_mm[None], torch.as_tensor(fixed_img.affine))
        det = jacobian_determinant(ddf_fixed_vox)[0]
        warped_lab = None
        if moving_lab is not None:
            warped_lab = sample_at(as_tensor(moving_lab), moving_img.affine, target, mode="nearest").cpu().numpy()
        # the inverse on the moving image's own grid, y -> φ⁻¹(y) in the fixed image's world
        y, source = result.inverse_points(moving_img.grid)
        ddf_moving_mm = source - y
        del y, source
    timings["compose_s"] = time.perf_counter() - t0
    overlap = check_overlap(target, moving_img.grid, moving_img.path, fixed_img.path, warn=False)
    if affine and overlap < WARN_OVERLAP:
        fov_warned = True
        warnings.append(f"only {100 * overlap:.0f} % of {fixed_img.path} lies inside the field of view of "
                        f"{moving_img.path}; the result is 0 elsewhere")
    for image, field_name in ((fixed_img, "ddf_mm.nii.gz"), (moving_img, "ddf_mm_inverse.nii.gz")):
        if has_shear(image.affine, image.ndim):
            warnings.append(f"{image.path} has sheared voxel axes, which ITK cannot represent: {field_name} is "
                            "exact for nibabel and deepsim warp, but SimpleITK/ANTs refuse it")
    t0 = time.perf_counter()
    with torch.no_grad():
        problems, checks = result_warnings(fixed_t, fixed_img.affine, moving_t, moving_img.affine, result,
                                           coverage=not fov_warned)
    warnings += problems
    timings["checks_s"] = time.perf_counter() - t0

    instance = result.instance
    report: dict = {
        "fixed": str(fixed_img.path), "moving": str(moving_img.path),
        "fixed_label": str(fixed_label) if fixed_label else None,
        "moving_label": str(moving_label) if moving_label else None,
        "stages": registrar.stages,
        "model": str(net.checkpoint) if net is not None else None,
        "similarity": net.similarity if net is not None else None,
        "regularization_weight": net.regularization_weight if net is not None else None,
        "model_spacing_mm": net.spacing_mm if net is not None else None,
        "working_grid": list(result.grid.shape), "device": str(device),
        "affine_prealignment": bool(affine), "affine_ras": to_moving.tolist() if affine else None,
        "affine_metric": affine_metric if affine else None,
        "contrast": choice.to_dict(),
        "warnings": warnings,
        "checks": {**orientation, **checks},
        "instance_optimisation": None if optimiser is None else {
            "loss": optimiser.loss_name, "transform": optimiser.transform,
            "levels": list(optimiser.scales), "iterations": list(optimiser.iterations),
            "steps_taken": instance.steps, "final_loss_per_level": instance.losses,
            "learning_rate": optimiser.learning_rate},
        "ddf_mm_itk_readable": not has_shear(fixed_img.affine, fixed_img.ndim),
        "ddf_mm_inverse_itk_readable": not has_shear(moving_img.affine, moving_img.ndim),
        # ‖φ⁻¹(φ(x)) − x‖ over the working grid (where φ(x) stays inside it)
        "inverse_consistency": {k: round(v, 5) for k, v in result.inverse_consistency().items()},
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
            "ddf_mm_inverse": lambda: save_displacement(staging / "ddf_mm_inverse.nii.gz",
                                                        ddf_moving_mm.cpu().numpy(), moving_img.affine,
                                                        like=moving_img.header),
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
        if affine:
            written["affine"] = save_itk_affine(staging / "affine.tfm", to_moving, fixed_img.ndim)
        timings["total_s"] = time.perf_counter() - started
        report["timings"] = {k: round(v, 3) for k, v in timings.items()}
        report["outputs"] = {name: path.name for name, path in written.items()}
        (staging / "registration.json").write_text(json.dumps(report, indent=2) + "\n")
        written["report"] = staging / "registration.json"
        published = publish_files(written, out_dir, inputs, "deepsim register", overwrite)
        report_warnings(warnings)  # once the result exists: a run that fails says only its error
        return published
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
    folding, std log|J|, the contrast path used, the number of warnings, seconds). Loading the model and Python's
    start-up are paid once, not per pair.

    ``options`` go to :func:`register_files` (``affine``, ``iterations``, ``learning_rate``, ``progress``,
    ``overwrite``, ``contrast``, ...).
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
                         "contrast": report["contrast"]["used"], "warnings": len(report["warnings"]),
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
    names = ["warped.nii.gz", "ddf_mm.nii.gz", "ddf_mm_inverse.nii.gz", "jacobian_det.nii.gz", "registration.json"]
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
