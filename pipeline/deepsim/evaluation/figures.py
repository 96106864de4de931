"""Report figures: registration overlay, deformed grid, Jacobian map, Dice box plot.

Every function takes numpy arrays or torch tensors and an output path, writes one PNG and returns its path.
Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never through ``pyplot``:
no screen is needed, no global backend is switched at import, and no figure stays registered in a pyplot
figure manager — nothing is left open once the function returns.

Shapes: images ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)``; fields ``(1, ndim, *spatial)`` or
``(ndim, *spatial)`` in voxels; determinants ``(1, *spatial)`` or ``(*spatial)``; 2D or 3D. For 3D inputs
``slice_axis`` picks the tensor axis the mid-slice is cut across; ``None`` draws one row (or panel) per axis.
Axes are tensor axes: anatomical names (axial, coronal, sagittal) depend on the volume's orientation, so the
panels say "axis k" rather than guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from deepsim.evaluation.summary import IDENTITY_METHOD
from deepsim.io import atomic_write

__all__ = ["plot_registration_overlay", "plot_deformation_grid", "plot_jacobian", "plot_dice_boxplot",
           "plot_method_gallery"]

PathLike = str | Path
ArrayLike = np.ndarray | torch.Tensor


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() or x.dtype == torch.bool else x
        return x.numpy()
    return np.asarray(x)


def _image(name: str, x: ArrayLike) -> np.ndarray:
    """A 2D or 3D float array: leading batch/channel axes of size 1 removed."""
    a = _numpy(x).astype(np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} has shape {tuple(_numpy(x).shape)}; expected a 2D or 3D image")
    return a


def _field(ddf: ArrayLike) -> np.ndarray:
    """``(ndim, *spatial)`` float array from ``(1, ndim, *spatial)`` or ``(ndim, *spatial)``."""
    u = _numpy(ddf).astype(np.float64)
    if u.ndim in (4, 5) and u.shape[0] == 1 and u.shape[1] == u.ndim - 2:
        u = u[0]
    if u.ndim not in (3, 4) or u.shape[0] != u.ndim - 1:
        raise ValueError(
            f"ddf has shape {tuple(_numpy(ddf).shape)}; expected (1, ndim, *spatial) or (ndim, *spatial), ndim 2 or 3"
        )
    return u


def _slice_axes(ndim: int, slice_axis: int | None) -> list[int | None]:
    if ndim == 2:
        return [None]
    if slice_axis is None:
        return [0, 1, 2]
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis is {slice_axis!r}; expected 0, 1, 2 or None for a 3D volume")
    return [slice_axis]


def _mid(a: np.ndarray, axis: int | None) -> np.ndarray:
    """Mid-slice of a 3D array across ``axis`` (a 2D array is returned as is)."""
    return a if axis is None else np.take(a, a.shape[axis] // 2, axis=axis)


def _axis_title(axis: int | None) -> str:
    return "" if axis is None else f"axis {axis} mid-slice"


def _normalise(a: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] by the 1st and 99th percentiles (robust to outliers); constant images give 0."""
    lo, hi = np.nanpercentile(a, [1, 99]) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def _save(fig: Figure, path: PathLike) -> Path:
    """Write the PNG atomically: a killed run never leaves a truncated figure."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _axes_grid(fig: Figure, rows: int, cols: int) -> np.ndarray:
    return np.asarray(fig.subplots(rows, cols, squeeze=False))


def plot_registration_overlay(
    fixed: ArrayLike, moving: ArrayLike, warped: ArrayLike, path: PathLike, slice_axis: int | None = None
) -> Path:
    """Columns fixed / moving / warped / red-green overlay (fixed red, warped green: aligned edges turn yellow).

    One row per slice axis for 3D volumes (``slice_axis=None``), one row for 2D images or a given axis.
    """
    images = [_image("fixed", fixed), _image("moving", moving), _image("warped", warped)]
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"fixed, moving and warped have shapes {[a.shape for a in images]}; expected one grid")
    axes_list = _slice_axes(images[0].ndim, slice_axis)
    fig = Figure(figsize=(12, 3 * len(axes_list)))
    grid = _axes_grid(fig, len(axes_list), 4)
    for row, axis in zip(grid, axes_list):
        f, m, w = (_normalise(_mid(a, axis)) for a in images)
        overlay = np.stack([f, w, np.zeros_like(f)], axis=-1)
        for ax, picture, title in zip(row, [f, m, w, overlay], ["fixed", "moving", "warped", "fixed (R) / warped (G)"]):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{title}\n{_axis_title(axis)}".strip(), fontsize=9)
            ax.set_axis_off()
    return _save(fig, path)


def plot_deformation_grid(
    ddf: ArrayLike,
    path: PathLike,
    image: ArrayLike | None = None,
    slice_axis: int | None = None,
    grid_step: int | None = None,
) -> Path:
    """Deformed grid lines ``x + u(x)`` of a mid-slice, in-plane displacement components only.

    Args:
        ddf: displacement field in voxels (pull-back: the grid shows where each fixed-grid point samples the
            moving image).
        path: output PNG.
        image: optional fixed image drawn underneath, same spatial shape.
        slice_axis: 3D only; ``None`` draws one panel per axis.
        grid_step: voxels between grid lines (default: about 16 lines along the shorter in-plane axis).
    """
    u = _field(ddf)
    ndim = u.shape[0]
    background = None if image is None else _image("image", image)
    if background is not None and background.shape != u.shape[1:]:
        raise ValueError(f"image has spatial shape {background.shape}; expected the field's {u.shape[1:]}")
    axes_list = _slice_axes(ndim, slice_axis)
    fig = Figure(figsize=(4.5 * len(axes_list), 4.5))
    grid = _axes_grid(fig, 1, len(axes_list))[0]
    for ax, axis in zip(grid, axes_list):
        p, q = [i for i in range(ndim) if i != axis]  # in-plane axes: rows, columns of the panel
        up = _mid(u[p], axis)
        uq = _mid(u[q], axis)
        n_p, n_q = up.shape
        step = grid_step or max(1, min(n_p, n_q) // 16)
        if background is not None:
            ax.imshow(_normalise(_mid(background, axis)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        rows, cols = np.arange(n_p), np.arange(n_q)
        for r in range(0, n_p, step):
            ax.plot(cols + uq[r, :], r + up[r, :], color="tab:red", linewidth=0.7)
        for c in range(0, n_q, step):
            ax.plot(c + uq[:, c], rows + up[:, c], color="tab:red", linewidth=0.7)
        ax.set_xlim(-0.5, n_q - 0.5)
        ax.set_ylim(n_p - 0.5, -0.5)  # image orientation: row 0 at the top
        ax.set_aspect("equal")
        ax.set_xlabel(f"axis {q}")
        ax.set_ylabel(f"axis {p}")
        ax.set_title(f"deformed grid {_axis_title(axis)}".strip(), fontsize=9)
    return _save(fig, path)


def plot_jacobian(det: ArrayLike, path: PathLike, slice_axis: int | None = None) -> Path:
    """Mid-slice map of ``det J`` on a diverging colormap centred at 1; folded voxels (``det J ≤ 0``) in black.

    The colour range spans at least [0, 2] so an identity field reads as uniform white.
    """
    d = _image("det", det)
    axes_list = _slice_axes(d.ndim, slice_axis)
    vmin = min(0.0, float(np.nanmin(d)))
    vmax = max(2.0, float(np.nanmax(d)))
    norm = TwoSlopeNorm(vmin=vmin, vcenter=1.0, vmax=vmax)
    folded_colour = ListedColormap(["black"])
    fig = Figure(figsize=(4.5 * len(axes_list) + 1, 4))
    grid = _axes_grid(fig, 1, len(axes_list))[0]
    image = None
    for ax, axis in zip(grid, axes_list):
        s = _mid(d, axis)
        image = ax.imshow(s, cmap="RdBu_r", norm=norm, interpolation="nearest")
        folded = s <= 0
        if folded.any():
            ax.imshow(np.ma.masked_where(~folded, np.ones_like(s)), cmap=folded_colour, interpolation="nearest")
        ax.set_title(f"det J {_axis_title(axis)}\nfolded (black): {100 * folded.mean():.2f} % of slice", fontsize=9)
        ax.set_axis_off()
    fig.colorbar(image, ax=list(grid), shrink=0.8, label="det J")
    return _save(fig, path)


def plot_dice_boxplot(results_df: pd.DataFrame, path: PathLike, methods: Sequence[str] | None = None) -> Path:
    """Box plot of per-pair ``dice_mean`` per method (identity first, then order of appearance), points on top.

    Args:
        results_df: long results table with columns ``method`` and ``dice_mean`` (one row per pair).
        path: output PNG.
        methods: optional explicit order / subset of methods.
    """
    missing = [c for c in ("method", "dice_mean") if c not in results_df.columns]
    if missing:
        raise ValueError(f"results_df lacks column(s) {missing}; it has {list(results_df.columns)}")
    if results_df.empty:
        raise ValueError("results_df has no rows; nothing to plot")
    if methods is None:
        methods = list(dict.fromkeys(results_df["method"].tolist()))
        methods.sort(key=lambda m: 0 if str(m).lower() == IDENTITY_METHOD else 1)  # stable: identity first
    values = [results_df.loc[results_df["method"] == m, "dice_mean"].dropna().to_numpy(float) for m in methods]
    fig = Figure(figsize=(max(4.0, 1.1 * len(methods) + 1.5), 4))
    ax = fig.subplots()
    positions = np.arange(1, len(methods) + 1)
    ax.boxplot(values, positions=positions, widths=0.6, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed seed: the same table always gives the same picture
    for x, v in zip(positions, values):
        ax.scatter(x + jitter.uniform(-0.12, 0.12, size=v.size), v, s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels([str(m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel("mean Dice per pair")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_method_gallery(
    fixed: ArrayLike,
    moving: ArrayLike,
    results: dict[str, tuple[ArrayLike, ArrayLike]],
    path: PathLike,
    slice_axis: int = 0,
    grid_step: int | None = None,
) -> Path:
    """One row per method: fixed, moving, warped, fixed (R) / warped (G) overlay, deformed grid over the fixed image.

    ``results`` maps a method name to ``(warped, ddf)``; ``ddf`` in voxels as in :func:`plot_deformation_grid`.
    3D volumes show the mid-slice across ``slice_axis``; 2D images are shown whole.
    """
    f_img, m_img = _image("fixed", fixed), _image("moving", moving)
    axis = None if f_img.ndim == 2 else slice_axis
    fig = Figure(figsize=(15, 3.2 * max(1, len(results))))
    grid = _axes_grid(fig, max(1, len(results)), 5)
    f, m = _normalise(_mid(f_img, axis)), _normalise(_mid(m_img, axis))
    for row, (method, (warped, ddf)) in zip(grid, results.items()):
        w = _normalise(_mid(_image("warped", warped), axis))
        overlay = np.stack([f, w, np.zeros_like(f)], axis=-1)
        for ax, picture, title in zip(row[:4], [f, m, w, overlay], ["fixed", "moving", "warped", "fixed R / warped G"]):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{method}: {title}" if title == "warped" else title, fontsize=9)
            ax.set_axis_off()
        u = _field(ddf)
        p, q = [i for i in range(u.shape[0]) if i != axis]
        up, uq = _mid(u[p], axis), _mid(u[q], axis)
        n_p, n_q = up.shape
        step = grid_step or max(1, min(n_p, n_q) // 16)
        ax = row[4]
        ax.imshow(f, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for r in range(0, n_p, step):
            ax.plot(np.arange(n_q) + uq[r, :], r + up[r, :], color="tab:red", linewidth=0.6)
        for c in range(0, n_q, step):
            ax.plot(c + uq[:, c], np.arange(n_p) + up[:, c], color="tab:red", linewidth=0.6)
        ax.set_xlim(-0.5, n_q - 0.5)
        ax.set_ylim(n_p - 0.5, -0.5)
        ax.set_title(f"{method}: deformed grid", fontsize=9)
        ax.set_axis_off()
    return _save(fig, path)
