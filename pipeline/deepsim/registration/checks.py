"""Checks that keep ``deepsim register`` from failing silently: which contrasts a pair is in, and whether a result
looks like a registration at all.

**Contrast** (:func:`choose_contrast`). Whether fixed and moving share a contrast decides the whole path
(:data:`PATHS`): intensity-based NCC and a network trained on one contrast, or mutual information and a
contrast-free loss. ``auto`` (the default) measures it: the moving image is placed on the fixed one by their
intensity centres of mass (the affine stage's start), both are blurred to :data:`CHECK_SPACING_MM`, and the rank
(Spearman) correlation of their intensities is taken inside the brain — the voxels bright enough in both images,
eroded by two voxels so that the brain's outline, bright against the background in every contrast, does not count.
A T1-weighted image against a T2- or PD-weighted one correlates negatively there (white matter is the brightest
tissue in one, the darkest in the other); two images of one contrast, even of two subjects only roughly aligned,
positively. Measured on the cross-contrast benchmark's renders at 2 mm (3 donors, every ordered pair, with and
without a 10° / 27 mm misplacement) and on nilearn's ICBM152 T1: same contrast 0.26 to 0.73, T1 against T2 or PD
−0.73 to −0.28. Below :data:`DIFFERENT_BELOW` the pair is taken as of different contrasts. T2 against PD correlates
positively (0.29 to 0.64: cerebrospinal fluid > grey > white matter in both) and is taken as one contrast.

**Results** (:func:`result_warnings`). A registration is reported, never passed off silently, when

- its final similarity is worse than its start: normalised mutual information (NMI, contrast-free) of the fixed
  image and the moving image read through the whole transform, inside the fixed image's foreground at
  :data:`CHECK_SPACING_MM`, below that of the inputs as they lie in world space;
- less than :data:`MIN_COVERED` of the fixed image's foreground maps inside the moving image (the moving image
  shows another or a smaller region: its slab met the fixed brain only in part);
- its affine is implausible for two brains: a scale outside :data:`SCALE_RANGE`, a shear beyond :data:`MAX_SHEAR`,
  a reflection (negative determinant), or a shift of the fixed image's centre, beyond the centre-of-mass start,
  of more than :data:`MAX_SHIFT_FRACTION` of the fixed field of view;
- the moving image, mirrored front to back or top to bottom through its centre of mass, relates to the fixed one
  better than as given (:func:`orientation_warnings`, before registering: a flipped axis or a wrong header);
- the user declared one contrast (``--contrast same``) where the images measure as two.

Each warning is one line on stderr (``deepsim: warning: ...``) and one entry of ``registration.json``'s
``"warnings"``. What cannot be seen from the images is not checked: a left-right flip of a symmetric brain
registers as well as the true orientation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from deepsim.filters import gaussian_smooth
from deepsim.geometry import Grid, grid_points, homogeneous, sample_at, working_grid
from deepsim.losses.nmi import normalized_mutual_information
from deepsim.registration.overlap import inside_fraction

__all__ = ["CONTRASTS", "ContrastPath", "PATHS", "ContrastChoice", "choose_contrast", "intensity_relation",
           "affine_warnings", "orientation_warnings", "result_warnings", "report_warnings", "CHECK_SPACING_MM", "DIFFERENT_BELOW",
           "SCALE_RANGE", "MAX_SHEAR", "MAX_SHIFT_FRACTION", "MIN_COVERED", "FLIP_MARGIN"]

#: what ``--contrast`` takes
CONTRASTS = ("auto", "same", "different")
#: the grid the checks run on (mm): coarse enough for 0.1 s at 1 mm, fine enough to see the brain's tissues
CHECK_SPACING_MM = 4.0
#: rank correlation inside the brain below which a pair is taken as of different contrasts (measured values in
#: the module docstring: same contrast >= 0.26, T1 against T2/PD <= -0.28)
DIFFERENT_BELOW = 0.1
#: a mirrored moving image must relate this much better than the image as given to be reported as flipped (on the
#: benchmark's 24 good 2 mm pairs and ICBM152 the image as given led every mirrored one by 0.10 or more; mirrored
#: copies of those pairs trailed by as much)
FLIP_MARGIN = 0.05
#: plausible scales of the affine between two adult brains (the linear part's QR diagonal)
SCALE_RANGE = (0.67, 1.5)
#: the largest plausible shear (off-diagonal of the QR factor, relative to its diagonal)
MAX_SHEAR = 0.25
#: the smallest fraction of the fixed image's foreground that must map inside the moving image's field of view
MIN_COVERED = 0.8
#: the largest plausible shift of the fixed centre beyond the centre-of-mass start, as a fraction of the fixed
#: image's longest side
MAX_SHIFT_FRACTION = 0.25


@dataclass(frozen=True)
class ContrastPath:
    """The stages for one kind of pair: the affine stage's metric, the instance optimisation loss (None: the
    model's own) and whether the registration network gives the start."""

    affine_metric: str
    loss: str | None
    network: bool


#: The path per kind of pair, chosen from the cross-contrast benchmark (benchmarks/results/cross_contrast_cpu.md,
#: the pre-training baseline: the shipped networks and feature nets were trained on one T1-like contrast, so across
#: contrasts the network's start is left out; NMI was the best test-time loss there, 0.432 Dice on T1 to T2 against
#: NCC's 0.380, MIND's 0.347 (the affine alone: 0.347) and DeepSim-seg's 0.215; one pair, 2 mm: replace it by
#: the 1 mm GPU table and the contrast-invariant feature nets once they exist).
PATHS: dict[str, ContrastPath] = {
    "same": ContrastPath(affine_metric="ncc", loss=None, network=True),
    "different": ContrastPath(affine_metric="mi", loss="nmi", network=False),
}


@dataclass(frozen=True)
class ContrastChoice:
    """``requested``: what the user asked (``auto``, ``same``, ``different``); ``relation``: the measured rank
    correlation (:func:`intensity_relation`); ``detected``: what it says; ``used``: the path taken."""

    requested: str
    relation: float
    detected: str
    used: str

    def to_dict(self) -> dict:
        relation = None if self.relation != self.relation else round(self.relation, 4)  # NaN: not measured
        return {"requested": self.requested, "relation": relation, "detected": self.detected,
                "used": self.used, "path": vars(PATHS[self.used])}


def _blurred(image: torch.Tensor, affine: np.ndarray, spacing_mm: float) -> torch.Tensor:
    """``image`` (*S) smoothed with σ = half the check spacing (in its own voxels), so sampling it at
    ``spacing_mm`` does not alias."""
    voxel = np.linalg.norm(homogeneous(affine, image.ndim)[:-1, :-1], axis=0)
    sigma = [max(spacing_mm / float(s) / 2.0, 0.0) for s in voxel]
    return gaussian_smooth(image.float()[None, None], sigma)[0, 0]


def _check_grid(fixed: torch.Tensor, fixed_affine: np.ndarray) -> Grid:
    return working_grid(Grid(tuple(int(n) for n in fixed.shape), np.asarray(fixed_affine, dtype=np.float64)),
                        CHECK_SPACING_MM, 1)


def _foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels above 15 % of the image's 99th percentile (of its non-zero voxels): the head or brain, not the air."""
    values = image[image > 0].flatten()
    if values.numel() == 0:
        return torch.zeros_like(image, dtype=torch.bool)
    step = max(1, values.numel() // 200_000)  # quantile's input limit, and speed
    return image > 0.15 * torch.quantile(values[::step].float(), 0.99)


def _erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Binary erosion of ``mask`` (*S) by a (2 voxels + 1)^d cube (a min-pool)."""
    x = mask.float()[None, None]
    pool = F.max_pool3d if mask.ndim == 3 else F.max_pool2d
    return (-pool(-x, 2 * voxels + 1, stride=1, padding=voxels))[0, 0] > 0.5


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def _relations(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor, moving_affine: np.ndarray,
               flips: tuple[int | None, ...]) -> list[float]:
    """Rank correlation inside the brain at the centre-of-mass start (see :func:`intensity_relation`) of the moving
    image as given (None) and mirrored along world axis k through its centre of mass, for each entry of ``flips``."""
    from deepsim.registration.affine import centre_of_mass

    grid = _check_grid(fixed, fixed_affine)
    points = grid_points(grid, fixed.device, torch.float32)
    moving_centre = centre_of_mass(moving, moving_affine)[:-1].float().view(-1, *[1] * fixed.ndim)
    offset = moving_centre - centre_of_mass(fixed, fixed_affine)[:-1].float().view(-1, *[1] * fixed.ndim)
    f = sample_at(_blurred(fixed, fixed_affine, CHECK_SPACING_MM), fixed_affine, points)
    m_blur = _blurred(moving, moving_affine, CHECK_SPACING_MM)
    out = []
    for axis in flips:
        shifted = points + offset
        if axis is not None:
            shifted = shifted.clone()
            shifted[axis] = 2 * moving_centre[axis] - shifted[axis]
        m = sample_at(m_blur, moving_affine, shifted)
        inner = _erode(_foreground(f) & _foreground(m), 2)
        out.append(_pearson(_ranks(f[inner].float()), _ranks(m[inner].float())) if int(inner.sum()) >= 50
                   else float("nan"))
    return out


def intensity_relation(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor,
                       moving_affine: np.ndarray) -> float:
    """Rank correlation of ``fixed`` (*S) and ``moving`` (*S') inside the brain at a centre-of-mass start, in
    [-1, 1] (see the module docstring): negative for a T1 against a T2- or PD-weighted image, positive for one
    contrast. NaN when the two images share too few bright voxels to tell (fewer than 50 at 4 mm: images smaller
    than about 2.5 cm)."""
    return _relations(fixed, fixed_affine, moving, moving_affine, (None,))[0]


def orientation_warnings(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor,
                         moving_affine: np.ndarray) -> tuple[list[str], dict]:
    """A warning when the moving image mirrored front to back or top to bottom (world axes A, S) relates to the
    fixed image more strongly (|rank correlation| larger by :data:`FLIP_MARGIN`) than the image as given: a flipped
    axis or a wrong header. Left–right is not tested: a brain is nearly symmetric about that axis."""
    given, *mirrored = _relations(fixed, fixed_affine, moving, moving_affine, (None, 1, 2)[: fixed.ndim])
    numbers = {"relation_given": given, **{f"relation_mirrored_{'AS'[i]}": r for i, r in enumerate(mirrored)}}
    problems = [f"the moving image relates better to the fixed one mirrored along the {('front-back', 'top-bottom')[i]}"
                f" axis (|rank correlation| {abs(r):.2f}, as given {abs(given):.2f}): a flipped axis or a wrong header?"
                for i, r in enumerate(mirrored) if abs(r) > abs(given) + FLIP_MARGIN]
    return problems, {k: round(v, 4) for k, v in numbers.items() if v == v}


def choose_contrast(requested: str, fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor,
                    moving_affine: np.ndarray) -> ContrastChoice:
    """The path for ``requested`` (``auto``: what :func:`intensity_relation` detects; ``same``/``different``: as
    told). The relation is measured in every case, so a declared contrast can be checked against it; when it
    cannot be measured (NaN: images too small) ``auto`` keeps the one-contrast path."""
    if requested not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {requested!r}")
    relation = intensity_relation(fixed, fixed_affine, moving, moving_affine)
    detected = "different" if relation < DIFFERENT_BELOW else "same"  # NaN compares False: same
    return ContrastChoice(requested, relation, detected, detected if requested == "auto" else requested)


def affine_warnings(matrix: np.ndarray, start: np.ndarray, fixed_grid: Grid) -> list[str]:
    """Why the affine ``matrix`` (4x4, fixed world -> moving world) is implausible between two brains, if it is.

    ``start``: the stage's centre-of-mass start (a translation), against which the shift is measured; the fixed
    image's centre and longest side come from ``fixed_grid``."""
    ndim = fixed_grid.ndim
    full = homogeneous(matrix, ndim)
    linear = full[:-1, :-1]
    problems = []
    det = float(np.linalg.det(linear))
    if det <= 0:
        problems.append(f"the affine reflects the image (determinant {det:.2f}): a flipped axis or a wrong header")
    # L = Q R with R upper triangular, its diagonal made positive: the scales and shears of an ITK-style split
    q, r = np.linalg.qr(linear)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    r = signs[:, None] * r
    scales = np.diag(r)
    if np.any(scales < SCALE_RANGE[0]) or np.any(scales > SCALE_RANGE[1]):
        problems.append("the affine scales the image by " + ", ".join(f"{s:.2f}" for s in scales)
                        + f" along its axes (plausible between two brains: {SCALE_RANGE[0]} to {SCALE_RANGE[1]})")
    shear = max((abs(r[i, j] / r[i, i]) for i in range(ndim) for j in range(i + 1, ndim) if r[i, i] > 0), default=0.0)
    if shear > MAX_SHEAR:
        problems.append(f"the affine shears the image by {shear:.2f} (plausible: at most {MAX_SHEAR})")
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in fixed_grid.shape], indexing="ij")).reshape(ndim, -1)
    world = homogeneous(fixed_grid.affine, ndim) @ np.vstack([corners, np.ones(corners.shape[1])])
    centre = np.append(world[:ndim].mean(axis=1), 1.0)
    extent = float((world[:ndim].max(axis=1) - world[:ndim].min(axis=1)).max())
    shift = float(np.linalg.norm((full @ centre - homogeneous(start, ndim) @ centre)[:ndim]))
    if shift > MAX_SHIFT_FRACTION * extent:
        problems.append(f"the affine moves the image's centre {shift:.0f} mm beyond the centre-of-mass start, "
                        f"{shift / extent:.0%} of the fixed field of view (plausible: at most "
                        f"{MAX_SHIFT_FRACTION:.0%})")
    return problems


def _nmi(fixed: torch.Tensor, moving: torch.Tensor) -> float:
    """NMI in [1, 2] of two equally shaped intensity samples (values scaled to the fixed image's [0, 1])."""
    scale = float(torch.quantile(fixed[::max(1, fixed.numel() // 200_000)].float(), 0.99)) or 1.0
    mscale = float(torch.quantile(moving[::max(1, moving.numel() // 200_000)].float(), 0.99)) or 1.0
    a = (fixed / scale).clamp(0, 1)[None, None]
    b = (moving / mscale).clamp(0, 1)[None, None]
    return float(normalized_mutual_information(a, b, num_bins=32)[0])


def _centre_of_mass_start(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor,
                          moving_affine: np.ndarray) -> np.ndarray:
    """The affine stage's start: the translation (4x4) between the two intensity centres of mass."""
    from deepsim.registration.affine import centre_of_mass

    start = np.eye(4)
    offset = (centre_of_mass(moving, moving_affine) - centre_of_mass(fixed, fixed_affine)).cpu().numpy()
    start[:fixed.ndim, 3] = offset[:fixed.ndim]
    return start


def result_warnings(fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor, moving_affine: np.ndarray,
                    registration, coverage: bool = True) -> tuple[list[str], dict]:
    """The warnings about a :class:`~deepsim.registration.pipeline.Registration` of ``moving`` to ``fixed`` (both
    (*S) intensities with their voxel -> RAS affines), and the numbers behind them.

    Similarity: NMI inside the fixed foreground at the start (the inputs in world space) and at the end (the moving
    image through the whole transform); the end below the start is a warning. Affine: :func:`affine_warnings`
    against the affine stage's centre-of-mass start. ``coverage=False``: the caller has already warned that the
    images overlap only in part, so the foreground coverage is measured but not warned about a second time."""
    grid = _check_grid(fixed, fixed_affine)
    x, target = registration.target_points(grid)
    f = sample_at(_blurred(fixed, fixed_affine, CHECK_SPACING_MM), fixed_affine, x)
    m_blur = _blurred(moving, moving_affine, CHECK_SPACING_MM)
    region = _foreground(f)
    before = _nmi(f[region], sample_at(m_blur, moving_affine, x)[region])
    after = _nmi(f[region], sample_at(m_blur, moving_affine, target)[region])
    covered = inside_fraction(target[:, region], Grid(tuple(int(n) for n in moving.shape), moving_affine))
    numbers = {"nmi_start": round(before, 4), "nmi_final": round(after, 4), "foreground_covered": round(covered, 4)}
    problems = []
    if coverage and covered < MIN_COVERED:
        problems.append(f"only {covered:.0%} of the fixed image's foreground maps inside the moving image after "
                        "registration: the moving image shows another or a smaller region")
    if after < before:
        problems.append(f"the registered images are less similar than the inputs as given (normalised mutual "
                        f"information {after:.3f} after, {before:.3f} before): the registration went wrong")
    if registration.affine is not None:
        start = _centre_of_mass_start(fixed, fixed_affine, moving, moving_affine)
        problems += affine_warnings(registration.matrix, start, grid)
    return problems, numbers


def report_warnings(warnings: list[str], prefix: str = "deepsim: warning: ") -> None:
    """Each warning as one line on stderr."""
    for warning in warnings:
        print(prefix + warning, file=sys.stderr, flush=True)

