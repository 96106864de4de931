"""Instance optimisation and the registration pipeline: analytic fields, a known deformation recovered, no folding."""

import numpy as np
import pytest
import torch

from deepsim.evaluation.jacobian import jacobian_determinant
from deepsim.registration.affine import AffineRegistration
from deepsim.registration.instance import (InstanceOptimisation, ddf_to_normalised, instance_similarity,
                                           integrate_velocity, normalised_to_ddf)
from deepsim.registration.pipeline import Registrar
from deepsim.losses import LocalNCCLoss
from deepsim.spatial import warp_image
from synthetic_fields import blob_scene, sine_field


def _scene(shape, seed=0):
    return blob_scene(shape, seed)


_smooth_field = sine_field


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_flow_of_a_constant_velocity_is_the_same_constant_shift(ndim):
    """exp(v) for a constant v is the translation by v: scaling and squaring is exact there."""
    v = torch.zeros(1, ndim, *[12] * ndim)
    for axis in range(ndim):
        v[:, axis] = 0.1 * (axis + 1)  # normalised units
    torch.testing.assert_close(integrate_velocity(v, 6), v, atol=1e-6, rtol=0)


def test_voxel_and_normalised_units_round_trip():
    ddf = torch.randn(1, 3, 9, 12, 15)
    back = normalised_to_ddf(ddf_to_normalised(ddf))
    torch.testing.assert_close(back, ddf)
    # one voxel along an axis of n voxels is 2 / (n - 1) in grid_sample's [-1, 1] coordinates
    torch.testing.assert_close(ddf_to_normalised(torch.ones(1, 3, 9, 12, 15))[0, :, 0, 0, 0],
                               torch.tensor([2 / 8, 2 / 11, 2 / 14]))


@pytest.mark.parametrize("transform", ["greedy", "svf"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_a_known_smooth_deformation_is_recovered_without_folding(transform, ndim):
    torch.manual_seed(0)
    shape = (64, 64) if ndim == 2 else (32, 36, 28)
    moving = _scene(shape)
    truth = _smooth_field(shape, 1.5)
    fixed = warp_image(moving, truth)  # fixed = moving ∘ (id + truth): the answer is truth
    settings = dict(scales=(2, 1), iterations=(80, 60), tolerance=1e-6, patience=20)
    if transform == "svf":
        settings.update(learning_rate=0.1, smooth_field=0.5)
    result = InstanceOptimisation(LocalNCCLoss(ndim, 5), transform=transform, **settings)(moving, fixed)
    before = float(((moving - fixed) ** 2).mean())
    after = float(((warp_image(moving, result.ddf) - fixed) ** 2).mean())
    assert after < 0.2 * before
    # where the image has structure, the error to the true displacement is less than half of what it was (blobs
    # leave motion along their iso-intensity lines undetermined: the aperture problem), and nothing folds
    inside = fixed[0, 0] > 0.2
    error = (result.ddf[0] - truth[0]).norm(dim=0)[inside].mean()
    assert float(error) < 0.5 * float(truth[0].norm(dim=0)[inside].mean())
    assert float(jacobian_determinant(result.ddf).min()) > 0


def test_identical_images_stop_on_the_plateau_and_stay_in_place_where_there_is_structure():
    """Where the image is (nearly) flat, local NCC says nothing and the field there is free; where it has structure
    the identity stays, the image does not change, and both levels end on the plateau, not on their budget."""
    image = _scene((24, 24, 24))
    optimiser = InstanceOptimisation(LocalNCCLoss(3, 5), scales=(2, 1), iterations=(100, 100), patience=5)
    result = optimiser(image, image)
    assert all(taken < 100 for taken in result.steps)
    structure = image[0, 0] > 0.2
    assert float(result.ddf[0].norm(dim=0)[structure].mean()) < 0.2
    assert float(((warp_image(image, result.ddf) - image) ** 2).mean()) < 1e-4


def test_starting_from_the_answer_keeps_it_where_a_start_from_the_identity_is_far_off():
    """The network's field is used as the start: from the answer, five steps stay near it (Adam's first steps have
    full length, so not exactly on it); from the identity, five steps are far from it."""
    shape = (32, 32, 32)
    moving, truth = _scene(shape, 2), _smooth_field(shape, 2.0, 2)
    fixed = warp_image(moving, truth)
    exact = InstanceOptimisation(LocalNCCLoss(3, 5), scales=(1,), iterations=(150,), tolerance=1e-7,
                                 patience=50)(moving, fixed).ddf
    five_steps = InstanceOptimisation(LocalNCCLoss(3, 5), scales=(1,), iterations=(5,))
    inside = fixed[0, 0] > 0.2
    distance = lambda ddf: float((ddf - exact)[0].norm(dim=0)[inside].mean())  # noqa: E731
    assert distance(five_steps(moving, fixed, init_ddf=exact).ddf) < 0.4
    assert distance(five_steps(moving, fixed).ddf) > 0.8


def test_instance_similarity_builds_test_time_losses_and_refuses_label_losses():
    assert instance_similarity("ncc", 3).window == 5
    with pytest.raises(ValueError, match="label"):
        instance_similarity("ncc-sup", 3)


def test_the_pipeline_composes_the_affine_and_the_deformation_in_world_space():
    """A moving image shifted by 4 mm: the affine stage finds the shift, the voxel field says 2 voxels (2 mm grid),
    and target_points on another grid (1 mm, other origin) sends each point 4 mm along."""
    fixed = _scene((40, 40, 40), 3)[0, 0]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving = torch.roll(fixed, shifts=2, dims=0)  # content 2 voxels = 4 mm further along axis 0
    registration = Registrar(affine=AffineRegistration())(fixed, affine, moving, affine)
    np.testing.assert_allclose(registration.matrix[:3, 3], [4.0, 0.0, 0.0], atol=0.2)
    ddf = registration.voxel_ddf()
    assert ddf.shape == (1, 3, 40, 40, 40)
    np.testing.assert_allclose(ddf[0, :, 10:30, 10:30, 10:30].mean(dim=(1, 2, 3)).numpy(), [2.0, 0.0, 0.0], atol=0.1)
    from deepsim.geometry import Grid

    other = Grid((10, 12, 14), np.array([[1.0, 0, 0, 20], [0, 1.0, 0, 25], [0, 0, 1.0, 30], [0, 0, 0, 1]]))
    x, target = registration.target_points(other)
    np.testing.assert_allclose((target - x).mean(dim=(1, 2, 3)).numpy(), [4.0, 0.0, 0.0], atol=0.2)
    assert registration.timings.keys() >= {"affine_s", "resample_s", "network_s", "instance_optimisation_s"}
    assert Registrar().stages == [] and Registrar(affine=AffineRegistration()).stages == ["affine"]


def test_plateau_stops_after_patience_steps_without_improvement_absolute_or_relative():
    from deepsim.registration.plateau import Plateau

    absolute = Plateau(tolerance=0.1, patience=2)
    # 1.0 improves on inf; 0.95 is not 0.1 below 1.0, nor is 0.92: two steps without improvement
    assert [absolute(v) for v in (1.0, 0.95, 0.92)] == [False, False, True]
    relative = Plateau(tolerance=0.1, patience=2, relative=True)
    # margins 10 % of the best: 0.5 -> 0.44 improves (below 0.45), 0.41 and 0.40 do not (need < 0.396)
    assert [relative(v) for v in (0.5, 0.44, 0.41, 0.40)] == [False, False, False, True]
    small = Plateau(tolerance=0.1, patience=1, relative=True)
    assert [small(v) for v in (1e-4, 8e-5)] == [False, False]  # relative: a small loss can still improve
