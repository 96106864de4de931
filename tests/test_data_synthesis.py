"""Synthesis of T1-like images from label maps: replayable from the seed, T1 contrast."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from deepsim.data.pairs import _toy_labels
from deepsim.data.synthesis import SynthesizeT1d, brain_mask, sample_synthesis_params, synthesize_t1


@pytest.fixture(scope="module")
def labels():
    return _toy_labels((40, 40, 40), np.random.default_rng(0))


def test_synthesis_is_reproducible_from_its_seed_and_differs_across_seeds(labels):
    values = np.unique(labels)
    a = synthesize_t1(labels, (2.0,) * 3, sample_synthesis_params(values, seed=3))
    b = synthesize_t1(labels, (2.0,) * 3, sample_synthesis_params(values, seed=3))
    c = synthesize_t1(labels, (2.0,) * 3, sample_synthesis_params(values, seed=4))
    assert a.dtype == np.float32 and a.shape == labels.shape and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    assert sample_synthesis_params(values, 3) == sample_synthesis_params(values, 3)


def test_white_matter_inside_the_closed_mask_is_brighter_than_cortex(labels):
    params = sample_synthesis_params(np.unique(labels), seed=0, subcortical_labels={5, 6})
    image = synthesize_t1(labels, (2.0,) * 3, params)
    brain, csf = brain_mask(labels, (2.0,) * 3)
    wm = brain & ~csf & (labels == 0)
    assert wm.sum() > 100
    cortex = np.isin(labels, [1, 2, 3, 4])
    assert image[wm].mean() > image[cortex].mean() + 0.1
    assert abs(image[~brain & ~csf].mean()) < 0.05  # background ≈ 0


def test_synthesize_dict_transform_keeps_the_label_affine(labels):
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 5.0, 3.0])
    label = MetaTensor(torch.from_numpy(labels.astype(np.float32))[None], affine=affine)
    out = SynthesizeT1d(seed=7)({"label": label})
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == label.shape
    torch.testing.assert_close(out["image"].affine, affine)
    again = SynthesizeT1d(seed=7)({"label": label})
    torch.testing.assert_close(out["image"], again["image"])
