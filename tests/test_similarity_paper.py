"""The paper's other baselines (NMI, MIND-SSC, NCC+sup): against slow reference loops and hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from monai.bundle import ConfigParser
from torch.utils.data import DataLoader

from deepsim.data.datasets import label_values
from deepsim.data.pairs import PairDataset, make_toy_dataset
from deepsim.engine.tasks import RegistrationTask
from deepsim.features.networks import build_feature_net
from deepsim.losses.mind import MINDSSCLoss, mind_ssc, mind_ssc_pairs
from deepsim.losses.nmi import NMILoss, normalized_mutual_information
from deepsim.registration.network import RegistrationNet
from deepsim.registration.objective import RegistrationObjective, build_objective
from deepsim.losses import FEATURE_NET_OF, SIMILARITY_NAMES, LocalNCCLoss, NCCSupLoss, build_similarity
from deepsim.losses.supervised import LabelOverlapLoss
from deepsim.spatial import warp_image
from deepsim.resources import bundle_dir


def _smooth(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[max(2, s // 4) for s in shape], generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, align_corners=False)


def _warped_with_grad(shape, seed=0):
    """(moving warped by a small random field, fixed, the field with requires_grad)."""
    g = torch.Generator().manual_seed(seed + 100)
    ddf = (0.5 * torch.randn(1, len(shape), *shape, generator=g)).requires_grad_(True)
    return warp_image(_smooth(shape, seed), ddf), _smooth(shape, seed + 1), ddf


def _assert_useful_gradient(grad):
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- NMI


def _nmi_reference(x, y, num_bins, vmin, vmax, fwhm_bins=1.0):
    """Direct Parzen NMI: one unit-mass Gaussian window per voxel, outer products summed voxel by voxel."""
    width = (vmax - vmin) / num_bins
    sigma = fwhm_bins * width / (2 * math.sqrt(2 * math.log(2)))
    centres = vmin + width * (np.arange(num_bins) + 0.5)
    joint = np.zeros((num_bins, num_bins))
    for a, b in zip(np.ravel(x), np.ravel(y)):
        wa = np.exp(-((min(max(a, vmin), vmax) - centres) ** 2) / (2 * sigma**2))
        wb = np.exp(-((min(max(b, vmin), vmax) - centres) ** 2) / (2 * sigma**2))
        joint += np.outer(wa / wa.sum(), wb / wb.sum())
    joint /= np.size(x)

    def entropy(p):
        p = p[p > 0]
        return -np.sum(p * np.log(p))

    return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / entropy(joint)


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 3)])
@pytest.mark.parametrize("vmin,vmax", [(0.0, 1.0), (-0.2, 1.5)])
def test_nmi_matches_direct_parzen_histogram(shape, vmin, vmax):
    g = torch.Generator().manual_seed(len(shape))
    # values beyond [0, 1] exercise the clamping to [vmin, vmax]
    x = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64) * 1.4 - 0.2
    y = 0.6 * x + 0.4 * torch.rand(2, 1, *shape, generator=g, dtype=torch.float64)
    ours = normalized_mutual_information(x, y, num_bins=8, vmin=vmin, vmax=vmax)
    for b in range(2):
        expected = _nmi_reference(x[b].numpy(), y[b].numpy(), 8, vmin, vmax)
        assert ours[b].item() == pytest.approx(expected, abs=1e-6)


def test_nmi_of_identical_two_level_image_is_the_hand_computed_parzen_value_and_tends_to_2():
    # Levels on the centres of bins 10 and 40 of 64: each voxel's window puts mass 2^(-4 k^2) / Z on the bin k
    # away (FWHM one bin), so H(X) = ln 2 + H(w), H(X, X) = ln 2 + 2 H(w) and NMI = 2 (ln 2 + H(w)) / (ln 2 + 2 H(w)).
    w = np.array([2.0 ** (-4 * k * k) for k in range(-4, 5)])
    w /= w.sum()
    h_w = -np.sum(w * np.log(w))
    expected = 2 * (math.log(2) + h_w) / (math.log(2) + 2 * h_w)
    assert expected == pytest.approx(1.4485, abs=1e-4)
    x = torch.full((1, 1, 8, 8), 10.5 / 64, dtype=torch.float64)
    x[..., 4:] = 40.5 / 64
    assert normalized_mutual_information(x, x).item() == pytest.approx(expected, abs=1e-6)
    assert NMILoss(sample_ratio=1.0)(x.float(), x.float()).item() == pytest.approx(2 - expected, abs=1e-5)
    assert normalized_mutual_information(x, x, fwhm_bins=0.1).item() == pytest.approx(2.0, abs=1e-6)


def test_nmi_of_independent_images_is_close_to_1_and_of_dependent_images_well_above():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 1, 48, 48, 48, generator=g)
    assert normalized_mutual_information(a, b).item() == pytest.approx(1.0, abs=0.01)
    assert normalized_mutual_information(a, (a + 0.05 * b).clamp(0, 1)).item() > 1.2


def test_nmi_loss_lies_in_0_1_and_its_voxel_sampling_replays_under_manual_seed():
    a, b = _smooth((24, 24, 24), 1), _smooth((24, 24, 24), 2)
    loss = NMILoss(sample_ratio=0.1)
    torch.manual_seed(5)
    first = loss(a, b).item()
    torch.manual_seed(5)
    again = loss(a, b).item()
    torch.manual_seed(6)
    other = loss(a, b).item()
    assert first == again and first != other
    assert 0.0 < first < 1.0


def test_nmi_loss_rejects_bad_arguments_by_name():
    with pytest.raises(ValueError, match="sample_ratio"):
        NMILoss(sample_ratio=0.0)
    with pytest.raises(ValueError, match="vmax"):
        NMILoss(vmin=1.0, vmax=1.0)


def test_nmi_gradient_reaches_the_displacement_field():
    warped, fixed, ddf = _warped_with_grad((20, 20, 20))
    NMILoss(sample_ratio=0.5)(warped, fixed).backward()
    _assert_useful_gradient(ddf.grad)


# ---------------------------------------------------------------- MIND-SSC


def test_mind_ssc_pairs_are_the_orthogonal_neighbour_pairs():
    def unit(ndim, axis, sign):
        return tuple(sign if i == axis else 0 for i in range(ndim))

    for ndim, count in ((2, 4), (3, 12)):
        expected = {frozenset((unit(ndim, i, s), unit(ndim, j, t)))
                    for i, j in itertools.combinations(range(ndim), 2) for s in (-1, 1) for t in (-1, 1)}
        pairs = mind_ssc_pairs(ndim)
        assert len(pairs) == count and {frozenset(p) for p in pairs} == expected


def _mind_reference(image, radius, dilation, clamp=True):
    """MIND-SSC voxel by voxel with clamped (replicated) indices, in float64."""
    shape = np.array(image.shape)
    pairs = mind_ssc_pairs(image.ndim)

    def at(index):
        return image[tuple(np.clip(index, 0, shape - 1).T)]

    offsets = np.array(list(itertools.product(range(-radius, radius + 1), repeat=image.ndim)))
    diff = np.zeros((len(pairs), *image.shape))
    for k, (a, b) in enumerate(pairs):
        for q in np.ndindex(*image.shape):
            q = np.array(q)
            diff[k][tuple(q)] = (at(q + dilation * np.array(a)) - at(q + dilation * np.array(b))) ** 2
    ssd = np.zeros_like(diff)
    for k in range(len(pairs)):
        for p in np.ndindex(*image.shape):
            ssd[k][p] = diff[k][tuple(np.clip(np.array(p) + offsets, 0, shape - 1).T)].mean()
    m = ssd - ssd.min(axis=0)
    v = m.mean(axis=0)
    if clamp:
        v = np.clip(v, 0.001 * v.mean(), 1000 * v.mean())
    return np.exp(-m / v)


@pytest.mark.parametrize("shape", [(7, 8), (6, 7, 5)])
@pytest.mark.parametrize("quiet", [False, True], ids=["random", "clamp-active"])
@pytest.mark.parametrize("radius,dilation", [(2, 2), (1, 1)])
def test_mind_ssc_matches_voxel_by_voxel_loop(shape, quiet, radius, dilation):
    rng = np.random.default_rng(len(shape))
    image = rng.random(shape)
    if quiet:  # all but the last row near-constant: V far from it is < 0.001 x its mean (lower clamp)
        image[:-1] = 0.5 + 1e-5 * image[:-1]
        unclamped = _mind_reference(image, radius, dilation, clamp=False)
        assert np.abs(unclamped - _mind_reference(image, radius, dilation)).max() > 0.1
    ours = mind_ssc(torch.from_numpy(image).float()[None, None], radius, dilation)[0].double().numpy()
    np.testing.assert_allclose(ours, _mind_reference(image, radius, dilation), atol=1e-5, rtol=0)


def test_mind_ssc_of_a_constant_image_is_1_not_nan():
    assert torch.equal(mind_ssc(torch.full((1, 1, 6, 6, 6), 0.3)), torch.ones(1, 12, 6, 6, 6))


@pytest.mark.parametrize("shape", [(16, 16), (12, 12, 12)])
def test_mind_loss_is_zero_for_identical_images_and_under_affine_intensity_change(shape):
    x, other = _smooth(shape, 3), _smooth(shape, 4)
    loss = MINDSSCLoss(spatial_dims=len(shape))
    assert loss(x, x).item() == 0.0
    assert loss(2 * x + 0.3, x).item() < 1e-10
    assert loss(other, x).item() > 1e-3


def test_mind_loss_gradient_reaches_the_displacement_field():
    warped, fixed, ddf = _warped_with_grad((16, 16, 16))
    MINDSSCLoss(3)(warped, fixed).backward()
    _assert_useful_gradient(ddf.grad)


def test_mind_loss_rejects_inputs_of_the_wrong_dimension():
    with pytest.raises(ValueError, match="spatial dimensions"):
        MINDSSCLoss(spatial_dims=3)(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------- NCC+sup


def _square(rows, cols, value, shape=(6, 6)):
    labels = torch.zeros(1, 1, *shape, dtype=torch.long)
    labels[..., rows[0]:rows[1], cols[0]:cols[1]] = value
    return labels


def _shift_ddf(cols, shape=(6, 6)):
    ddf = torch.zeros(1, 2, *shape)
    ddf[:, 1] = cols
    return ddf


def test_ncc_sup_label_term_is_hand_computed_soft_dice_and_mse_of_one_hots():
    # moving: label 1002 on rows 1-3, cols 1-3; fixed: the same square one column to the right.
    moving, fixed = _square((1, 4), (1, 4), 1002), _square((1, 4), (2, 5), 1002)
    dice = NCCSupLoss([0, 1002], spatial_dims=2, label_downsample=1)
    mse = NCCSupLoss([0, 1002], spatial_dims=2, label_term="mse", label_downsample=1)
    # no warp: 6 of 9 voxels overlap -> Dice 2*6/18; 6 voxels differ in both one-hot channels -> 12 / (2*36)
    assert dice.label_loss(moving, fixed, _shift_ddf(0.0)).item() == pytest.approx(1 - 2 / 3, abs=1e-5)
    assert mse.label_loss(moving, fixed, _shift_ddf(0.0)).item() == pytest.approx(12 / 72, abs=1e-6)
    # warped[c] = moving[c - 1] aligns the squares exactly
    assert dice.label_loss(moving, fixed, _shift_ddf(-1.0)).item() == pytest.approx(0.0, abs=1e-5)
    assert mse.label_loss(moving, fixed, _shift_ddf(-1.0)).item() == pytest.approx(0.0, abs=1e-7)
    # half a voxel: bilinear one-hot 0.5, 1, 1, 0.5 on cols 1-4 -> soft Dice 2*7.5/18; squared diffs 2*3*(0.25+0.25)
    assert dice.label_loss(moving, fixed, _shift_ddf(-0.5)).item() == pytest.approx(1 - 15 / 18, abs=1e-5)
    assert mse.label_loss(moving, fixed, _shift_ddf(-0.5)).item() == pytest.approx(3 / 72, abs=1e-6)


def test_ncc_sup_adds_weighted_label_term_to_local_ncc():
    a, b = _smooth((16, 16), 1), _smooth((16, 16), 2)
    moving, fixed = _square((2, 9), (2, 9), 7, (16, 16)), _square((4, 12), (3, 10), 7, (16, 16))
    ddf = torch.zeros(1, 2, 16, 16)
    loss = NCCSupLoss([7], spatial_dims=2, window=5, label_weight=0.5, label_downsample=1)
    total = loss(a, b, ddf=ddf, moving_label=moving, fixed_label=fixed)
    expected = LocalNCCLoss(2, window=5)(a, b) + 0.5 * loss.label_loss(moving, fixed, ddf)
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss(a, a, ddf=ddf, moving_label=fixed, fixed_label=fixed).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("label_term", ["dice", "mse"])
def test_ncc_sup_coarse_label_term_equals_full_resolution_on_block_aligned_labels_and_shifts(label_term):
    # labels constant on 2x2 blocks and a shift of 2 fine voxels (1 coarse voxel): pooling commutes with the warp
    moving, fixed = _square((2, 8), (2, 6), 1002, (12, 12)), _square((2, 8), (4, 8), 1002, (12, 12))
    ddf = torch.zeros(1, 2, 12, 12)
    ddf[:, 1] = -2.0
    fine = NCCSupLoss([1002], spatial_dims=2, label_term=label_term, label_downsample=1)
    coarse = NCCSupLoss([1002], spatial_dims=2, label_term=label_term, label_downsample=2)
    for field in (torch.zeros_like(ddf), ddf):
        assert coarse.label_loss(moving, fixed, field).item() == pytest.approx(
            fine.label_loss(moving, fixed, field).item(), abs=1e-5)
    assert fine.label_loss(moving, fixed, ddf).item() == pytest.approx(0.0, abs=1e-6)  # the shift aligns them


@pytest.mark.parametrize("label_term", ["dice", "mse"])
def test_ncc_sup_label_term_gradient_reaches_the_displacement_field(label_term):
    moving, fixed = _square((1, 4), (1, 4), 1002), _square((1, 4), (2, 5), 1002)
    ddf = _shift_ddf(-0.3).requires_grad_(True)
    NCCSupLoss([1002], spatial_dims=2, label_term=label_term).label_loss(moving, fixed, ddf).backward()
    _assert_useful_gradient(ddf.grad)


def test_ncc_sup_names_missing_label_values_and_labels():
    with pytest.raises(ValueError, match="label_values"):
        build_objective("ncc-sup", 1.0)
    objective = build_objective("ncc-sup", 1.0, spatial_dims=2, label_values=[1])
    with pytest.raises(ValueError, match="moving_label and fixed_label"):
        objective(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="label_term"):
        NCCSupLoss([1], label_term="ce")


# ---------------------------------------------------------------- registry and wiring


@pytest.mark.parametrize("name", SIMILARITY_NAMES)
def test_every_similarity_name_builds_and_scores_a_misaligned_pair_above_an_identical_one(name):
    assert FEATURE_NET_OF[name] in (None, "ae", "seg")
    torch.manual_seed(0)  # nmi draws its voxel sample, the feature nets their weights
    kwargs = {}
    if FEATURE_NET_OF[name] is not None:
        kind = FEATURE_NET_OF[name]
        kwargs["feature_net"] = build_feature_net(kind, 3, 1, num_classes=3 if kind == "seg" else None, channels=(4, 8))
    if name in ("ncc-sup", "dice"):
        kwargs["label_values"] = [0, 1]
    objective = RegistrationObjective(build_similarity(name, 3, **kwargs), regularization_weight=1.0)
    a, b = _smooth((16, 16, 16), 1), _smooth((16, 16, 16), 2)
    labels = {"moving_label": (b > 0.5).long(), "fixed_label": (a > 0.5).long()}
    ddf = torch.zeros(1, 3, 16, 16, 16)
    same = objective(a, a, ddf, labels["fixed_label"], labels["fixed_label"])["similarity"]
    different = objective(b, a, ddf, **labels)["similarity"]
    assert torch.isfinite(different) and different.item() > same.item() + 1e-3
    assert set(FEATURE_NET_OF) == set(SIMILARITY_NAMES)


def test_registration_task_with_ncc_sup_trains_on_toy_pairs_through_the_label_term(tmp_path):
    datalist = make_toy_dataset(tmp_path / "toy", shape=(16, 16, 16), n_subjects=4, seed=0)
    values = label_values(datalist)
    assert values == list(range(7))
    objective = build_objective("ncc-sup", 1.0, spatial_dims=3, label_values=values)
    batch = next(iter(DataLoader(PairDataset(datalist, "training", num_pairs=2, seed=0), batch_size=2)))
    torch.manual_seed(0)
    net = RegistrationNet(3, 1, channels=(4, 8, 8))
    out = RegistrationTask(objective)(net, batch, "cpu")
    out["loss"].backward()
    _assert_useful_gradient(net.flow[1].weight.grad)
    with torch.no_grad():
        ddf = net(batch["moving"].float(), batch["fixed"].float())
        label_term = objective.similarity.label_loss(batch["moving_label"], batch["fixed_label"], ddf)
    assert label_term.item() > 0.01
    assert out["similarity"].item() == pytest.approx(
        objective.similarity.ncc(warp_image(batch["moving"].float(), ddf), batch["fixed"].float()).item()
        + label_term.item(), abs=1e-5)


def test_registration_bundle_hands_the_datalist_label_values_to_ncc_sup(tmp_path):
    datalist = make_toy_dataset(tmp_path / "toy", shape=(16, 16, 16), n_subjects=4, seed=0)
    configs = bundle_dir() / "configs"
    parser = ConfigParser()
    parser.read_meta(configs / "metadata.json")
    parser.read_config([str(configs / "common.json"), str(configs / "train_registration.json")])
    parser.update({"datalist": str(datalist), "similarity": "ncc-sup", "device": "cpu"})
    objective = parser.get_parsed_content("objective")
    assert isinstance(objective.similarity, NCCSupLoss) and objective.similarity.labels.indexer.num_classes == 7
    assert objective.regularization_weight == parser.get_parsed_content("lambdas")["ncc-sup"]


@pytest.mark.parametrize("shape", [(1, 1, 10, 12, 9), (2, 1, 7, 8)])
def test_ncc_sup_block_fractions_equal_average_pooled_one_hots(shape):
    values = [0, 3, 1002, 2035]
    labels = torch.tensor(values)[torch.randint(0, 4, shape)]
    loss = LabelOverlapLoss(values)
    one_hot = F.one_hot(loss.indexer.to_index(labels[:, 0]), 4).movedim(-1, 1).float()
    pool = F.avg_pool3d if len(shape) == 5 else F.avg_pool2d
    assert torch.equal(loss._onehot(labels, 2), pool(one_hot, 2))
    assert torch.equal(loss._onehot(labels, 1), one_hot)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_label_overlap_is_zero_for_the_true_shift_and_positive_without_it(spatial_dims):
    """A label map shifted by 3 voxels along the first axis; the field that undoes the shift scores ~0."""
    shape = (24,) * spatial_dims
    labels = torch.zeros((1, 1, *shape), dtype=torch.long)
    labels[(0, 0, slice(6, 14), *[slice(8, 16)] * (spatial_dims - 1))] = 5
    labels[(0, 0, slice(14, 18), *[slice(4, 20)] * (spatial_dims - 1))] = 9
    moving = torch.roll(labels, shifts=3, dims=2)  # moving[x] = fixed[x - 3]  =>  warped[x] = moving[x + 3]
    loss = LabelOverlapLoss([0, 5, 9], label_downsample=1)
    ddf = torch.zeros((1, spatial_dims, *shape))
    ddf[:, 0] = 3.0
    ones = torch.ones((1, 1, *shape))
    assert float(loss(ones, ones, ddf=ddf, moving_label=moving, fixed_label=labels)) < 1e-4
    assert float(loss(ones, ones, ddf=torch.zeros_like(ddf), moving_label=moving, fixed_label=labels)) > 0.2


def test_dice_similarity_needs_label_values_and_builds_the_overlap_loss():
    with pytest.raises(ValueError, match="label_values"):
        build_similarity("dice", 3)
    assert isinstance(build_similarity("dice", 3, label_values=[0, 1, 2]), LabelOverlapLoss)
    assert FEATURE_NET_OF["dice"] is None
