"""Dice overlap per label between a fixed label map and a warped moving label map (DESIGN §4).

One definition, used by training validation, evaluation, the CLI and benchmarks alike:

    Dice_l = 2 |F_l ∩ W_l| / (|F_l| + |W_l|),   F_l = {x : fixed[x] = l},  W_l = {x : warped[x] = l}

for every label ``l`` present in the fixed map except background 0 (or an explicit list). A label present in
the fixed map and absent from the warped one scores 0. A label absent from both (possible only with an explicit
list) is NaN — there is nothing to overlap — and :func:`mean_dice` skips it.

All labels are scored in one pass with ``bincount`` over label indices, so the cost does not grow with the
number of labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["dice_per_label", "mean_dice"]

# Largest label-value range scored with a lookup table (8 MiB of int64); wider ranges are sorted instead.
_DENSE_SPAN = 1 << 20


def _as_label_tensor(name: str, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Label map as an int64 tensor. Float maps (e.g. from nearest-neighbour ``Warp``) are rounded."""
    t = torch.as_tensor(x)
    if t.is_floating_point():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values; expected an integer label map")
        t = torch.round(t)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; expected an integer label map")
    return t.to(torch.int64)


def _spatial_shape(shape: torch.Size) -> tuple[int, ...]:
    """Drop leading singleton (batch/channel) dimensions: (1, 1, *spatial) and (1, *spatial) → spatial."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def dice_per_label(
    fixed_label: np.ndarray | torch.Tensor,
    warped_label: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> dict[int, float]:
    """Dice of every label for ONE pair.

    Args:
        fixed_label: label map of the fixed image, shape ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)``;
            numpy or torch; integer values (float maps are rounded). 0 is background.
        warped_label: moving label map warped onto the fixed grid, same spatial shape.
        labels: label values to score. Default: the values present in ``fixed_label`` except 0.

    Returns:
        ``{label: dice}`` in increasing label order; 0.0 for a label missing from ``warped_label``, NaN for a
        label (from an explicit list) missing from both maps.
    """
    fixed = _as_label_tensor("fixed_label", fixed_label)
    warped = _as_label_tensor("warped_label", warped_label).to(fixed.device)
    fixed_shape, warped_shape = _spatial_shape(fixed.shape), _spatial_shape(warped.shape)
    if fixed_shape != warped_shape:
        raise ValueError(
            f"fixed_label has spatial shape {fixed_shape} and warped_label {warped_shape}; "
            "they must lie on the same grid (one pair, batch and channel of size 1)"
        )
    if fixed.numel() == 0:
        raise ValueError(f"fixed_label has shape {tuple(fixed.shape)}; expected a non-empty label map")
    fixed, warped = fixed.reshape(-1), warped.reshape(-1)

    given = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).reshape(-1).to(fixed.device)
    ends = [fixed.min(), fixed.max(), warped.min(), warped.max()]
    if given is not None and given.numel():
        ends += [given.min(), given.max()]
    lo, hi = (int(v) for v in torch.stack(ends).aminmax())
    span = hi - lo + 1
    # Label values are usually small non-negative integers (FreeSurfer: < 15000): a lookup table indexed by
    # value is then ~10x faster than sorting (torch.unique / searchsorted). Huge value ranges fall back to sorting.
    dense = span <= max(_DENSE_SPAN, fixed.numel())

    if given is not None:
        values = torch.unique(given)
    elif dense:
        values = torch.nonzero(torch.bincount(fixed - lo, minlength=span)).reshape(-1) + lo
    else:
        values = torch.unique(fixed)  # sorted
    if labels is None:
        values = values[values != 0]
    if values.numel() == 0:
        return {}
    k = values.numel()

    if dense:
        lookup = torch.full((span,), k, dtype=torch.int64, device=fixed.device)
        lookup[values - lo] = torch.arange(k, device=fixed.device)

        def label_index(x: torch.Tensor) -> torch.Tensor:
            # Position of each voxel's value in `values`, or k (an overflow bin) when it is not scored.
            return lookup[x - lo]

    else:

        def label_index(x: torch.Tensor) -> torch.Tensor:
            idx = torch.searchsorted(values, x).clamp_(max=k - 1)
            return torch.where(values[idx] == x, idx, torch.full_like(idx, k))

    fixed_idx, warped_idx = label_index(fixed), label_index(warped)
    size_fixed = torch.bincount(fixed_idx, minlength=k + 1)[:k]
    size_warped = torch.bincount(warped_idx, minlength=k + 1)[:k]
    overlap = torch.bincount(fixed_idx[fixed == warped], minlength=k + 1)[:k]

    denominator = (size_fixed + size_warped).to(torch.float64)
    dice = 2.0 * overlap.to(torch.float64) / denominator  # 0/0 → NaN for labels absent from both
    return {int(v): float(d) for v, d in zip(values.tolist(), dice.tolist())}


def mean_dice(per_label: Mapping[int, float]) -> float:
    """Mean of the per-label Dice scores, skipping NaN (labels absent from both maps); NaN if none is left."""
    scores = [float(v) for v in per_label.values() if not math.isnan(float(v))]
    return sum(scores) / len(scores) if scores else float("nan")
