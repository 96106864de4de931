"""Dice per label: hand-computed cases and agreement with MONAI's DiceMetric on one-hot maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from deepsim.evaluation.dice import dice_per_label, mean_dice

# FreeSurfer Desikan–Killiany-like values: scattered, large, not contiguous.
DK_LIKE = [0, 17, 53, 1002, 1035, 2002, 2035]


def test_dice_of_hand_computed_tiny_maps():
    fixed = torch.tensor([[1, 1, 2, 2], [0, 0, 3, 3]])
    warped = torch.tensor([[1, 0, 2, 2], [1, 0, 0, 0]])
    # label 1: |F|=2, |W|=2, overlap 1 → 0.5; label 2: 2, 2, 2 → 1.0; label 3: 2, 0, 0 → 0.0
    result = dice_per_label(fixed, warped)
    assert result == pytest.approx({1: 0.5, 2: 1.0, 3: 0.0})
    assert mean_dice(result) == pytest.approx(0.5)


def test_label_missing_from_warped_scores_zero_and_background_is_ignored():
    fixed = np.array([[0, 1002], [2035, 2035]])
    warped = np.array([[1002, 0], [0, 0]])
    assert dice_per_label(fixed, warped) == {1002: 0.0, 2035: 0.0}


def test_identical_maps_score_one_for_every_label():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor(DK_LIKE)[torch.randint(0, len(DK_LIKE), (1, 1, 6, 7, 5), generator=g)]
    result = dice_per_label(labels, labels)
    assert set(result) == set(torch.unique(labels).tolist()) - {0}
    assert all(v == 1.0 for v in result.values())


def test_explicit_label_list_scores_only_those_and_nan_when_absent_from_both():
    fixed = torch.tensor([[1, 2], [2, 0]])
    warped = torch.tensor([[1, 1], [2, 0]])
    result = dice_per_label(fixed, warped, labels=[2, 7])
    assert list(result) == [2, 7]
    assert result[2] == pytest.approx(2 * 1 / (2 + 1))
    assert math.isnan(result[7])
    assert mean_dice(result) == pytest.approx(2 / 3)  # NaN skipped


def test_accepts_channel_axis_numpy_torch_and_float_warped_labels():
    fixed = torch.tensor([[[3, 3], [0, 5]]])  # (1, 2, 2)
    warped = fixed.squeeze(0).numpy().astype(np.float32)  # e.g. nearest-neighbour Warp output
    assert dice_per_label(fixed, warped) == {3: 1.0, 5: 1.0}
    assert dice_per_label(fixed.unsqueeze(0), torch.as_tensor(warped)) == {3: 1.0, 5: 1.0}


def test_mismatched_grids_raise_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"fixed_label has spatial shape \(2, 3\)"):
        dice_per_label(torch.zeros(2, 3), torch.zeros(3, 2))


def test_huge_label_values_give_the_same_dice_as_small_ones():
    g = torch.Generator().manual_seed(2)
    fixed = torch.randint(0, 5, (9, 9), generator=g)
    warped = torch.randint(0, 5, (9, 9), generator=g)
    small = dice_per_label(fixed, warped)
    huge = dice_per_label(fixed * 10**12, warped * 10**12)  # value range too wide for the lookup table
    assert list(huge.values()) == pytest.approx(list(small.values()))


@pytest.mark.parametrize("spatial", [(13, 11), (7, 9, 6)], ids=["2d", "3d"])
def test_dice_matches_monai_dice_metric_on_random_one_hot_maps(spatial):
    g = torch.Generator().manual_seed(0)
    values = torch.tensor(DK_LIKE)
    fixed = values[torch.randint(0, len(values), (1, 1, *spatial), generator=g)]
    # warped: fixed with about half the voxels relabelled, and one label removed entirely (scores 0)
    noise = values[torch.randint(0, len(values), fixed.shape, generator=g)]
    warped = torch.where(torch.rand(fixed.shape, generator=g) < 0.5, noise, fixed)
    warped[warped == 1035] = 0

    ours = dice_per_label(fixed, warped)
    labels = sorted(ours)
    one_hot = lambda x: torch.cat([(x == v).float() for v in labels], dim=1)  # noqa: E731
    metric = DiceMetric(include_background=True, reduction="none")
    reference = metric(one_hot(warped), one_hot(fixed))[0]
    assert list(ours.values()) == pytest.approx(reference.tolist(), abs=1e-6)
    assert ours[1035] == 0.0
