"""Images synthesised from label maps, SynthMorph-style: real anatomy, synthetic contrast.

Randomness is drawn apart from its use (TorchIO's ``make_params`` / ``apply`` split): a :class:`SynthesisParams`
record holds everything about one image (an intensity per label and tissue, blur, bias field, noise), and
:func:`synthesize_image` is a deterministic function of (labels, spacing, params). The record can be logged and
replayed. Two ways to make the record:

- :func:`sample_synthesis_params`: a random T1-like contrast from a seed (the training images);
- :func:`tissue_params`: a fixed :class:`TissueTable` (one mean intensity per tissue class) with the same blur,
  bias and noise options; :mod:`deepsim.data.contrasts` holds the T1-, T2- and PD-like tables.

The Desikan–Killiany maps have no white-matter label, so the brain is rebuilt from the labels: the labelled
voxels are closed (≈6 mm ball, on a ≈2 mm grid for speed) and their holes filled in 3D and slice by slice;
inside-but-unlabelled voxels get white-matter intensity, except those within ≈2 mm of the brain's outer
surface, which are sulcal CSF (dark). A 2 mm CSF rim surrounds the brain; everything else is 0 (skull-stripped).
Random T1 contrast (fractions of the intensity range): WM ≈ 0.8, subcortical grey 0.55–0.65, cortical grey
0.45–0.55 with per-label jitter, CSF 0.1–0.2; then Gaussian blur (≈1 mm), a smooth multiplicative bias field
(±5–10 %) and Gaussian noise (sd 2–4 % of WM): :func:`acquire` applies these three to any noiseless image.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage as ndi

from deepsim.data.embedded import DK_SUBCORTICAL_LABELS

__all__ = ["SynthesisParams", "TissueTable", "sample_synthesis_params", "tissue_params", "brain_mask", "acquire",
           "synthesize_image", "synthesize_t1", "SynthesizeT1d"]

_BIAS_ORDER = 3  # cosine basis functions per axis (orders 0..2): a field smoother than the brain


@dataclass(frozen=True)
class SynthesisParams:
    """Everything random about one synthesised image (intensities are fractions of the range [0, 1])."""

    label_means: dict[int, float]  # label value (> 0) → mean intensity
    wm_mean: float  # inside the brain mask, unlabelled and deep: white matter
    csf_mean: float  # sulci near the surface and a thin rim around the brain
    background_mean: float  # outside the brain
    bias_coeffs: tuple[float, ...]  # _BIAS_ORDER**3 cosine coefficients of the log bias field
    bias_strength: float  # max |log bias|, e.g. 0.08 → field in [0.92, 1.08]
    noise_sd: float  # absolute sd of the additive Gaussian noise
    noise_seed: int  # seeds the noise field, which depends on the volume's shape
    blur_sigma_mm: float  # Gaussian blur sigma in millimetres

    def to_dict(self) -> dict:
        """Plain JSON-able values (for logging)."""
        out = asdict(self)
        out["label_means"] = {str(k): v for k, v in self.label_means.items()}
        return out


@dataclass(frozen=True)
class TissueTable:
    """One contrast: the mean intensity of each tissue class, fractions of the range [0, 1]."""

    white_matter: float  # inside the brain mask, unlabelled and deep (the DK maps have no WM label)
    cortical_grey: float  # every labelled structure not in the subcortical set
    subcortical_grey: float  # the subcortical labels (thalamus ... amygdala, brainstem)
    csf: float  # sulci near the surface and a thin rim around the brain
    background: float = 0.0  # outside the brain (skull-stripped)

    def brightest(self) -> float:
        return max(self.white_matter, self.cortical_grey, self.subcortical_grey, self.csf, self.background)


def _label_means(label_values: Sequence[int], subcortical_labels: Collection[int], cortical: Callable[[], float],
                 subcortical: Callable[[], float]) -> dict[int, float]:
    """label value (> 0, ascending) -> mean intensity, from ``subcortical()`` or ``cortical()`` (called in that
    order, so a random draw per label replays from the same generator)."""
    return {value: subcortical() if value in subcortical_labels else cortical()
            for value in sorted({int(v) for v in label_values} - {0})}


def sample_synthesis_params(
    label_values: Sequence[int],
    seed: int,
    subcortical_labels: Collection[int] = DK_SUBCORTICAL_LABELS,
) -> SynthesisParams:
    """Draw a T1-like contrast for the labels ``label_values`` (0 is ignored) from ``seed``; same seed, same params."""
    rng = np.random.default_rng(seed)
    wm = float(rng.uniform(0.75, 0.85))
    cortex = float(rng.uniform(0.46, 0.54))
    means = _label_means(label_values, subcortical_labels,
                         cortical=lambda: float(np.clip(cortex + rng.normal(0.0, 0.015), 0.44, 0.56)),
                         subcortical=lambda: float(rng.uniform(0.55, 0.65)))
    return SynthesisParams(
        label_means=means,
        wm_mean=wm,
        csf_mean=float(rng.uniform(0.10, 0.20)),
        background_mean=0.0,
        bias_coeffs=tuple(float(c) for c in rng.normal(size=_BIAS_ORDER**3)),
        bias_strength=float(rng.uniform(0.05, 0.10)),
        noise_sd=float(rng.uniform(0.02, 0.04) * wm),
        noise_seed=int(rng.integers(2**31 - 1)),
        blur_sigma_mm=float(rng.uniform(0.8, 1.2)),
    )


def tissue_params(
    table: TissueTable,
    label_values: Sequence[int],
    seed: int,
    subcortical_labels: Collection[int] = DK_SUBCORTICAL_LABELS,
    bias_strength: float = 0.075,
    noise_fraction: float = 0.03,
    blur_sigma_mm: float = 1.0,
) -> SynthesisParams:
    """The fixed contrast ``table`` for the labels ``label_values``; only the bias field's shape and the noise are
    drawn from ``seed``. ``bias_strength``: max |log bias| (0: none); ``noise_fraction``: noise sd as a fraction of
    the table's brightest tissue (0: none); ``blur_sigma_mm``: Gaussian blur σ (0: none). The defaults are the
    centres of the ranges :func:`sample_synthesis_params` draws from."""
    if bias_strength < 0 or noise_fraction < 0 or blur_sigma_mm < 0:
        raise ValueError(f"bias_strength, noise_fraction and blur_sigma_mm must be >= 0, got {bias_strength}, "
                         f"{noise_fraction}, {blur_sigma_mm}")
    rng = np.random.default_rng(seed)
    return SynthesisParams(
        label_means=_label_means(label_values, subcortical_labels, cortical=lambda: table.cortical_grey,
                                 subcortical=lambda: table.subcortical_grey),
        wm_mean=table.white_matter,
        csf_mean=table.csf,
        background_mean=table.background,
        bias_coeffs=tuple(float(c) for c in rng.normal(size=_BIAS_ORDER**3)),
        bias_strength=float(bias_strength),
        noise_sd=float(noise_fraction * table.brightest()),
        noise_seed=int(rng.integers(2**31 - 1)),
        blur_sigma_mm=float(blur_sigma_mm),
    )


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Union of 3D hole filling and 2D hole filling of the slices along each axis (the medial wall is open in 3D)."""
    out = ndi.binary_fill_holes(mask)
    for axis in range(3):
        structure = np.zeros((3, 3, 3), dtype=bool)
        index = [slice(None)] * 3
        index[axis] = 1
        structure[tuple(index)] = ndi.generate_binary_structure(2, 1)
        out |= ndi.binary_fill_holes(mask, structure=structure)
    return out


def brain_mask(
    labels: np.ndarray, spacing_mm: Sequence[float], closing_mm: float = 6.0, shell_mm: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Brain and CSF masks of a label map (labels > 0 are brain).

    Returns ``(brain, csf)`` boolean arrays of ``labels.shape``: ``brain`` = labelled voxels closed with a
    ``closing_mm`` ball and hole-filled; ``csf`` = unlabelled brain voxels within ``shell_mm`` of the brain's
    surface plus a ``shell_mm`` rim outside it. The morphology runs on a grid of ≈``shell_mm`` voxels (fast).
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    if labels.ndim != 3 or spacing.shape != (3,):
        raise ValueError(f"labels must be 3D with 3 spacings, got shape {labels.shape} and spacing {spacing_mm}")
    step = np.maximum(1, np.round(shell_mm / spacing)).astype(int)
    fg = labels > 0
    coarse = np.zeros([-(-n // s) for n, s in zip(fg.shape, step)], dtype=bool)
    view = fg[:: step[0], :: step[1], :: step[2]]  # nearest-voxel subsampling: thin cortex survives at ≤ 2 mm
    coarse[tuple(slice(0, n) for n in view.shape)] = view
    pad = int(np.ceil(closing_mm / 2 / float(np.min(spacing * step)))) + 1
    coarse = np.pad(coarse, pad)  # closing must not be cut by the volume's edge
    closed = ndi.binary_closing(coarse, _ball(pad - 1))
    filled = _fill_slices(closed)
    inner = ndi.binary_erosion(filled)
    rim = ndi.binary_dilation(filled) & ~filled
    shell = (filled & ~inner) | rim

    def upsample(m: np.ndarray) -> np.ndarray:
        m = m[pad:-pad, pad:-pad, pad:-pad]
        for axis, s in enumerate(step):
            m = np.repeat(m, s, axis=axis)
        return m[: fg.shape[0], : fg.shape[1], : fg.shape[2]]

    brain = upsample(filled) | fg
    csf = upsample(shell) & ~fg
    return brain, csf


def _bias_field(shape: Sequence[int], coeffs: Sequence[float], strength: float) -> np.ndarray:
    """exp of a smooth field in [-strength, strength] spanned by low-order cosines along each axis."""
    basis = []
    for n in shape:
        x = (np.arange(n) + 0.5) / n
        basis.append(np.stack([np.cos(np.pi * k * x) for k in range(_BIAS_ORDER)]).astype(np.float32))
    c = np.asarray(coeffs, dtype=np.float32).reshape((_BIAS_ORDER,) * 3)
    c[0, 0, 0] = 0.0  # the mean intensity is set by the label means, not by the field
    field = np.einsum("ijk,ix,jy,kz->xyz", c, *basis, optimize=True)
    field *= strength / max(float(np.abs(field).max()), 1e-6)
    return np.exp(field, dtype=np.float32)


def acquire(image: np.ndarray, spacing_mm: Sequence[float], params: SynthesisParams) -> np.ndarray:
    """What the scanner adds to a noiseless tissue image (float32, 3D): Gaussian blur (``params.blur_sigma_mm``),
    the smooth multiplicative bias field, then additive Gaussian noise (``params.noise_sd``, from
    ``params.noise_seed``). Each is skipped when its strength is 0."""
    image = np.asarray(image, dtype=np.float32)
    if params.blur_sigma_mm > 0:
        sigma = params.blur_sigma_mm / np.asarray(spacing_mm, dtype=float)
        image = ndi.gaussian_filter(image, sigma, mode="constant", truncate=3.0)
    if params.bias_strength > 0:
        image = image * _bias_field(image.shape, params.bias_coeffs, params.bias_strength)
    if params.noise_sd > 0:
        noise = np.random.default_rng(params.noise_seed).standard_normal(image.shape, dtype=np.float32)
        image = image + np.float32(params.noise_sd) * noise
    return image.astype(np.float32, copy=False)


def synthesize_image(
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    params: SynthesisParams,
    masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Image (float32, ``labels.shape``) of a 3D label map with voxel size ``spacing_mm`` in the contrast ``params``
    describes (T1-like from :func:`sample_synthesis_params`, any table through :func:`tissue_params`).

    ``masks``: ``brain_mask(labels, spacing_mm)`` when already computed (it depends on the labels only).
    Labels missing from ``params.label_means`` get the mean of the cortical means.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D array, got shape {labels.shape}")
    brain, csf = masks if masks is not None else brain_mask(labels, spacing_mm)
    values = np.asarray(labels, dtype=np.int64)
    top = int(max(values.max(), max(params.label_means, default=0)))
    default = float(np.mean(list(params.label_means.values()))) if params.label_means else params.wm_mean
    lut = np.full(top + 1, default, dtype=np.float32)
    lut[0] = params.wm_mean
    for value, mean in params.label_means.items():
        lut[value] = mean
    image = lut[np.clip(values, 0, top)]
    image[csf] = params.csf_mean
    image[~brain & ~csf] = params.background_mean
    return acquire(image, spacing_mm, params)


#: the name the T1 callers use: with :func:`sample_synthesis_params`' record the image is T1-like
synthesize_t1 = synthesize_image


class SynthesizeT1d(MapTransform):
    """Dictionary transform: ``data[image_key] = synthesize_t1(data[label_key])``, keeping the label's affine.

    ``label_key`` holds a channel-first (1, D, H, W) label map (MetaTensor or array); the image gets the same
    shape and, for a MetaTensor, a copy of its metadata. ``seed`` fixes the contrast; each call draws the same
    params for the same label values. Precomputed ``brain_mask`` output may sit at ``data[mask_key]``.
    """

    def __init__(
        self,
        label_key: str = "label",
        image_key: str = "image",
        seed: int = 0,
        mask_key: str | None = None,
        subcortical_labels: Collection[int] = DK_SUBCORTICAL_LABELS,
    ) -> None:
        super().__init__([label_key])
        self.label_key, self.image_key, self.seed, self.mask_key = label_key, image_key, int(seed), mask_key
        self.subcortical_labels = subcortical_labels

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = d[self.label_key]
        array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        if array.ndim != 4 or array.shape[0] != 1:
            raise ValueError(f"{self.label_key} must be channel-first (1, D, H, W), got shape {array.shape}")
        if isinstance(label, MetaTensor):
            spacing = np.linalg.norm(label.affine.numpy()[:3, :3], axis=0)
        else:
            spacing = np.ones(3)
        values = np.unique(array)
        params = sample_synthesis_params(values.astype(int).tolist(), self.seed, self.subcortical_labels)
        masks = d.get(self.mask_key) if self.mask_key else None
        image = synthesize_t1(array[0], spacing, params, masks)[None]
        if isinstance(label, MetaTensor):
            out = MetaTensor(torch.from_numpy(image), affine=label.affine.clone(), meta={k: v for k, v in label.meta.items() if k != "affine"})
        else:
            out = torch.from_numpy(image)
        d[self.image_key] = out
        return d

