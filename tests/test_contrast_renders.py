"""Fixed T1-, T2- and PD-like renders: tables from the spin-echo equation, exact tissue values, one noise per seed."""

import numpy as np
import pytest

from deepsim.data.contrasts import (BRAINWEB_TISSUES, CONTRASTS, SPIN_ECHO, contrast_params, render_contrast,
                                    render_tissue_maps, spin_echo_signal)
from deepsim.data.pairs import _toy_labels
from deepsim.data.synthesis import brain_mask, sample_synthesis_params, synthesize_t1, tissue_params

SUBCORTICAL = {5, 6}  # the toy map's two inner "nuclei"


@pytest.fixture(scope="module")
def labels():
    return _toy_labels((40, 40, 40), np.random.default_rng(0))


@pytest.mark.parametrize("contrast", ["t2", "pd"])
def test_t2_and_pd_tables_are_brainwebs_spin_echo_signal_scaled_to_0_8(contrast):
    tr, te = SPIN_ECHO[contrast]
    signal = {t: spin_echo_signal(**p, tr_ms=tr, te_ms=te) for t, p in BRAINWEB_TISSUES.items()}
    scale = 0.8 / max(signal.values())
    table = CONTRASTS[contrast]
    assert table.csf == pytest.approx(signal["csf"] * scale, abs=6e-4)
    assert table.cortical_grey == pytest.approx(signal["grey"] * scale, abs=6e-4)
    assert table.white_matter == pytest.approx(signal["white"] * scale, abs=6e-4)
    assert table.subcortical_grey == pytest.approx(table.cortical_grey + (table.white_matter - table.cortical_grey) / 3,
                                                   abs=6e-4)


def test_spin_echo_signal_of_a_hand_computed_case():
    # PD 0.5, TR = T1 (1 - 1/e), TE = T2 (1/e)
    assert spin_echo_signal(1000.0, 80.0, 0.5, 1000.0, 80.0) == pytest.approx(0.5 * (1 - np.exp(-1)) * np.exp(-1))


def test_tissue_order_is_t1s_reversed_in_t2_and_pd():
    t1, t2, pd = CONTRASTS["t1"], CONTRASTS["t2"], CONTRASTS["pd"]
    assert t1.white_matter > t1.subcortical_grey > t1.cortical_grey > t1.csf > t1.background
    for table in (t2, pd):
        assert table.csf > table.cortical_grey > table.subcortical_grey > table.white_matter > table.background
    assert t1.brightest() == t2.brightest() == pd.brightest() == 0.8


@pytest.mark.parametrize("contrast", list(CONTRASTS))
def test_a_noiseless_render_holds_the_tables_values_in_each_tissue(labels, contrast):
    spacing = (2.0,) * 3
    image = render_contrast(labels, spacing, contrast, seed=1, subcortical_labels=SUBCORTICAL, bias_strength=0.0,
                            noise_fraction=0.0, blur_sigma_mm=0.0)
    brain, csf = brain_mask(labels, spacing)
    table = CONTRASTS[contrast]
    expected = {"cortex": (np.isin(labels, [1, 2, 3, 4]), table.cortical_grey),
                "nuclei": (np.isin(labels, list(SUBCORTICAL)), table.subcortical_grey),
                "white": (brain & ~csf & (labels == 0), table.white_matter), "csf": (csf, table.csf),
                "background": (~brain & ~csf, table.background)}
    for name, (region, value) in expected.items():
        assert region.any(), name
        np.testing.assert_allclose(image[region], value, atol=1e-6, err_msg=name)


def test_one_seed_gives_one_bias_field_and_noise_in_every_contrast(labels):
    spacing = (2.0,) * 3
    clean = {c: render_contrast(labels, spacing, c, 4, noise_fraction=0.0, bias_strength=0.0) for c in CONTRASTS}
    noisy = {c: render_contrast(labels, spacing, c, 4, noise_fraction=0.05, bias_strength=0.0) for c in CONTRASTS}
    noise = {c: noisy[c] - clean[c] for c in CONTRASTS}
    np.testing.assert_allclose(noise["t1"], noise["t2"], atol=1e-5)
    np.testing.assert_allclose(noise["t1"], noise["pd"], atol=1e-5)
    assert noise["t1"].std() == pytest.approx(0.05 * 0.8, rel=0.05)  # a fraction of the brightest tissue
    other = render_contrast(labels, spacing, "t1", 5, noise_fraction=0.05, bias_strength=0.0) - clean["t1"]
    assert np.abs(other - noise["t1"]).mean() > 0.01


def test_the_t1_tables_render_equals_the_t1_synthesis_at_the_centre_of_its_ranges(labels):
    """The refactor: the random T1 synthesis and a fixed table go through one renderer."""
    values = np.unique(labels)
    random_t1 = sample_synthesis_params(values, seed=0, subcortical_labels=SUBCORTICAL)
    fixed_t1 = tissue_params(CONTRASTS["t1"], values, seed=0, subcortical_labels=SUBCORTICAL)
    assert abs(random_t1.wm_mean - fixed_t1.wm_mean) <= 0.05 and abs(random_t1.csf_mean - fixed_t1.csf_mean) <= 0.05
    image = synthesize_t1(labels, (2.0,) * 3, fixed_t1)
    again = render_contrast(labels, (2.0,) * 3, "t1", 0, subcortical_labels=SUBCORTICAL)
    np.testing.assert_array_equal(image, again)


def test_contrast_params_refuse_an_unknown_contrast_and_negative_options(labels):
    with pytest.raises(ValueError, match="contrast must be one of t1, t2, pd"):
        contrast_params("flair", [1, 2], 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        contrast_params("t2", [1, 2], 0, noise_fraction=-0.1)


def test_tissue_maps_render_as_probability_weighted_table_values():
    grey = np.zeros((6, 6, 6), np.float32)
    white = np.zeros_like(grey)
    brain = np.zeros(grey.shape, bool)
    brain[1:5, 1:5, 1:5] = True
    grey[2, 2, 2], white[3, 3, 3] = 1.0, 1.0
    grey[2, 3, 2], white[2, 3, 2] = 0.25, 0.5  # the rest of this voxel is CSF
    image = render_tissue_maps(grey, white, brain, (1.0,) * 3, "t2", seed=0, bias_strength=0.0, noise_fraction=0.0)
    t2 = CONTRASTS["t2"]
    assert image[2, 2, 2] == pytest.approx(t2.cortical_grey)
    assert image[3, 3, 3] == pytest.approx(t2.white_matter)
    assert image[2, 3, 2] == pytest.approx(0.25 * t2.cortical_grey + 0.5 * t2.white_matter + 0.25 * t2.csf)
    assert image[1, 1, 1] == pytest.approx(t2.csf)  # inside the brain, neither grey nor white
    assert image[0, 0, 0] == pytest.approx(t2.background)
