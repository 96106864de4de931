"""Fixed T1-, T2- and PD-like renders of one anatomy: the images of the cross-contrast benchmark.

A contrast is a :class:`~deepsim.data.synthesis.TissueTable`, one mean intensity per tissue class, written here
and never drawn at random; blur, bias field and noise are those of the T1 synthesis
(:func:`deepsim.data.synthesis.tissue_params`), so a T2-like image of a donor differs from its T1-like image in
contrast only. Two sources of anatomy:

- a label map (the embedded Desikan–Killiany donors): :func:`render_contrast`, through
  :func:`deepsim.data.synthesis.synthesize_image`;
- tissue probability maps (nilearn's ICBM152 grey and white matter): :func:`render_tissue_maps`, each voxel the
  probability-weighted mean of the table's intensities.

Where the tables come from:

- ``t1``: the centre of the ranges the random T1 synthesis draws from (WM 0.80, cortical grey 0.50, subcortical
  grey 0.60, CSF 0.15), i.e. the contrast the shipped networks and feature nets were trained on. Its ratios
  (GM/WM 0.63, CSF/WM 0.19) are those of an MPRAGE T1: WM brightest, CSF darkest.
- ``t2`` and ``pd``: the spin-echo signal ``S = PD · (1 − exp(−TR/T1)) · exp(−TE/T2)`` of each tissue with
  BrainWeb's 1.5 T tissue parameters (Kwan, Evans & Pike, IEEE TMI 18(11), 1999; :data:`BRAINWEB_TISSUES`) and
  BrainWeb's dual-echo acquisition, TR 3300 ms with TE 120 ms (T2) and 35 ms (PD), scaled so that the brightest
  tissue is 0.80 like the T1's white matter. T2: CSF ≫ grey > white matter (the T1 order reversed); PD: CSF >
  grey > white matter with little contrast (GM/WM 1.19).
- Deep grey nuclei (thalamus, basal ganglia) are partly myelinated, their relaxation times between those of cortex
  and white matter: in every table a third of the way from cortical grey to white matter, as in the T1 synthesis
  (0.60 between 0.50 and 0.80).

The tables are checked against the signal equation in ``tests/test_contrast_renders.py``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

from deepsim.data.embedded import DK_SUBCORTICAL_LABELS
from deepsim.data.synthesis import SynthesisParams, TissueTable, acquire, synthesize_image, tissue_params

__all__ = ["CONTRASTS", "BRAINWEB_TISSUES", "SPIN_ECHO", "spin_echo_signal", "contrast_params", "render_contrast",
           "render_tissue_maps"]

#: BrainWeb's tissue parameters at 1.5 T (Kwan, Evans & Pike 1999): T1 and T2 in ms, proton density relative to CSF
BRAINWEB_TISSUES: dict[str, dict[str, float]] = {
    "csf": {"t1_ms": 2569.0, "t2_ms": 329.0, "pd": 1.0},
    "grey": {"t1_ms": 833.0, "t2_ms": 83.0, "pd": 0.86},
    "white": {"t1_ms": 500.0, "t2_ms": 70.0, "pd": 0.77},
}
#: BrainWeb's dual-echo spin-echo acquisition (TR, TE in ms) of its T2- and PD-weighted volumes
SPIN_ECHO: dict[str, tuple[float, float]] = {"t2": (3300.0, 120.0), "pd": (3300.0, 35.0)}


def spin_echo_signal(t1_ms: float, t2_ms: float, pd: float, tr_ms: float, te_ms: float) -> float:
    """Spin-echo signal of a tissue, S = PD (1 − exp(−TR/T1)) exp(−TE/T2) (arbitrary units)."""
    return pd * (1.0 - math.exp(-tr_ms / t1_ms)) * math.exp(-te_ms / t2_ms)


def _subcortical(grey: float, white: float) -> float:
    return grey + (white - grey) / 3.0


#: the fixed contrasts, by name (values rounded to 3 decimals; see the module docstring for their sources)
CONTRASTS: dict[str, TissueTable] = {
    # the centre of the T1 synthesis' ranges (deepsim.data.synthesis.sample_synthesis_params)
    "t1": TissueTable(white_matter=0.800, cortical_grey=0.500, subcortical_grey=0.600, csf=0.150),
    # BrainWeb spin echo TR 3300 / TE 120 ms: CSF 0.502, GM 0.199, WM 0.139 (a.u.), scaled by 0.80 / 0.502
    "t2": TissueTable(white_matter=0.221, cortical_grey=0.317, subcortical_grey=0.285, csf=0.800),
    # BrainWeb spin echo TR 3300 / TE 35 ms: CSF 0.650, GM 0.554, WM 0.466 (a.u.), scaled by 0.80 / 0.650
    "pd": TissueTable(white_matter=0.574, cortical_grey=0.681, subcortical_grey=0.645, csf=0.800),
}


def _table(contrast: str) -> TissueTable:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    return CONTRASTS[contrast]


def contrast_params(contrast: str, label_values: Sequence[int], seed: int,
                    subcortical_labels: Collection[int] = DK_SUBCORTICAL_LABELS, **options: float) -> SynthesisParams:
    """The synthesis record of ``contrast`` (``t1``, ``t2``, ``pd``) for these labels; ``seed`` draws the bias
    field and the noise only. ``options``: ``bias_strength``, ``noise_fraction``, ``blur_sigma_mm`` of
    :func:`deepsim.data.synthesis.tissue_params`."""
    return tissue_params(_table(contrast), label_values, seed, subcortical_labels, **options)


def render_contrast(labels: np.ndarray, spacing_mm: Sequence[float], contrast: str, seed: int,
                    masks: tuple[np.ndarray, np.ndarray] | None = None,
                    subcortical_labels: Collection[int] = DK_SUBCORTICAL_LABELS, **options: float) -> np.ndarray:
    """``contrast``-like image (float32, ``labels.shape``) of a 3D label map with voxels of ``spacing_mm``.

    ``masks``: :func:`deepsim.data.synthesis.brain_mask` of the labels when already computed; ``options``: see
    :func:`contrast_params`. The same ``seed`` gives the same bias field and noise in every contrast."""
    params = contrast_params(contrast, np.unique(labels).tolist(), seed, subcortical_labels, **options)
    return synthesize_image(labels, spacing_mm, params, masks)


def render_tissue_maps(grey: np.ndarray, white: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float],
                       contrast: str, seed: int, **options: float) -> np.ndarray:
    """``contrast``-like image (float32) of tissue probability maps (grey, white in [0, 1], same shape).

    Inside ``brain`` (bool), whatever is neither grey nor white matter is CSF; outside it, background. Each voxel
    is the probability-weighted mean of the table's intensities (cortical grey for all grey matter: the maps do
    not tell cortex from nuclei), then blurred, biased and noised as :func:`contrast_params` says
    (``blur_sigma_mm`` defaults to 0 here: probability maps are already smooth)."""
    grey, white = np.asarray(grey, dtype=np.float32), np.asarray(white, dtype=np.float32)
    if grey.shape != white.shape or grey.shape != np.shape(brain) or grey.ndim != 3:
        raise ValueError(f"grey {grey.shape}, white {white.shape} and brain {np.shape(brain)} must be one 3D shape")
    table = _table(contrast)
    grey, white = np.clip(grey, 0.0, 1.0), np.clip(white, 0.0, 1.0)
    csf = np.where(brain, np.clip(1.0 - grey - white, 0.0, 1.0), 0.0)
    outside = np.clip(1.0 - grey - white - csf, 0.0, 1.0)
    image = (grey * table.cortical_grey + white * table.white_matter + csf * table.csf
             + outside * table.background).astype(np.float32)
    options = {"blur_sigma_mm": 0.0, **options}
    return acquire(image, spacing_mm, tissue_params(table, [], seed, **options))
