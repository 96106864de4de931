"""Inverse transforms: field inversion, the symmetric (mid-space) model, inverse consistency, the written inverse."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.evaluation.jacobian import jacobian_determinant
from deepsim.losses import LocalNCCLoss
from deepsim.registration.affine import AffineRegistration
from deepsim.registration.fields import compose, ddf_to_normalised, invert_displacement, normalised_to_ddf
from deepsim.registration.instance import InstanceOptimisation
from deepsim.registration.pipeline import Registrar
from deepsim.spatial import warp_image
from synthetic_fields import blob_scene, sine_field


def _scene(shape, seed=0):
    """Blobs spread wider and finer than the default scene: structure near every part of the grid."""
    return blob_scene(shape, seed, blobs=30, spread=(0.15, 0.85), width=(0.03, 0.07))


_smooth_field = sine_field


def _interior(shape, margin):
    return (slice(None), slice(None), *[slice(margin, n - margin) for n in shape])


# ----------------------------------------------------------------------------------------- 1. field inversion
@pytest.mark.parametrize("ndim", [2, 3])
def test_inverting_a_constant_shift_gives_the_opposite_shift(ndim):
    shape = (20, 24) if ndim == 2 else (12, 14, 10)
    shift = torch.zeros(1, ndim, *shape)
    for axis in range(ndim):
        shift[:, axis] = 0.7 * (axis + 1) * (-1) ** axis  # voxels
    inverse = normalised_to_ddf(invert_displacement(ddf_to_normalised(shift)))
    torch.testing.assert_close(inverse, -shift, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_smooth_field_and_its_inverse_compose_to_the_identity_both_ways(ndim):
    """det J of the field spans 0.41 to 1.84 in 3D: stretched and squeezed twofold, where the plain fixed-point
    iteration v ← −u ∘ (id + v) no longer converges."""
    shape = (48, 40) if ndim == 2 else (40, 44, 36)
    field = _smooth_field(shape, 2.0 if ndim == 2 else 1.0, seed=3)
    assert float(jacobian_determinant(field).min()) > 0.4
    u = ddf_to_normalised(field)
    v = invert_displacement(u)
    interior = _interior(shape, 4)  # points that stay inside the grid both ways
    # (id + u) ∘ (id + v) = id is the equation the iteration solves at the grid points: converged
    assert float(normalised_to_ddf(compose(u, v))[interior].norm(dim=1).max()) < 2e-3  # voxels
    # (id + v) ∘ (id + u) reads v between grid points: linear interpolation's error of a field with second
    # derivatives of ~0.1 voxel per voxel², about 0.1 / 8 (measured: mean 0.011 in 2D, 0.018 in 3D)
    residual = normalised_to_ddf(compose(v, u))[interior].norm(dim=1)
    assert float(residual.mean()) < 0.025 and float(residual.max()) < 0.1


def test_a_folded_field_is_inverted_where_it_can_be_and_stays_bounded_where_it_cannot():
    """Amplitude 2 voxels on a small grid folds (det J < 0 somewhere): no inverse exists there, but the result
    stays finite and no longer than the field, and it is exact where the map is invertible around."""
    field = _smooth_field((24, 28, 20), 2.0, seed=3)
    assert float(jacobian_determinant(field).min()) < 0
    v = normalised_to_ddf(invert_displacement(ddf_to_normalised(field)))
    assert bool(v.isfinite().all()) and float(v.norm(dim=1).max()) < 2 * float(field.norm(dim=1).max())


# ------------------------------------------------------------------------------ 2. the symmetric transform model
def _symmetric(**changes):
    settings = dict(transform="symmetric", scales=(2, 1), iterations=(60, 40), tolerance=1e-6, patience=20)
    return InstanceOptimisation(LocalNCCLoss(3, 5), **{**settings, **changes})


def test_symmetric_model_recovers_a_known_shift_and_its_inverse_is_the_opposite_shift():
    """fixed = moving shifted by a constant (1.5, -1, 0.5) voxels: the forward field is that shift where the
    image has structure, and the inverse field is minus the forward one."""
    shape = (32, 36, 28)
    moving = _scene(shape, 1)
    truth = torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    fixed = warp_image(moving, truth)
    result = _symmetric()(moving, fixed)
    inside = (fixed[0, 0] > 0.2) & torch.zeros(shape, dtype=torch.bool).index_fill_(0, torch.arange(4, 28), True)
    error = (result.ddf[0] - truth[0]).norm(dim=0)[inside]
    assert float(error.mean()) < 0.25
    assert float((result.ddf[0] + result.inverse_ddf[0]).norm(dim=0)[inside].mean()) < 0.1


@pytest.mark.parametrize("transform", ["symmetric", "greedy", "svf"])
def test_every_model_returns_an_inverse_consistent_unfolded_transform(transform):
    """‖φ⁻¹∘φ − id‖ mean ≤ 0.1 voxel on a smooth synthetic deformation, and neither map folds."""
    shape = (32, 36, 28)
    moving = _scene(shape, 2)
    fixed = warp_image(moving, _smooth_field(shape, 1.5, seed=4))
    changes = {"transform": transform} if transform != "svf" else {"transform": "svf", "learning_rate": 0.1}
    result = _symmetric(**changes)(moving, fixed)
    assert (result.inverse_ddf is None) == (transform == "greedy")  # greedy inverts only when asked for
    inverse = result.inverse()
    u, v = ddf_to_normalised(result.ddf), ddf_to_normalised(inverse)
    error = normalised_to_ddf(compose(v, u))[_interior(shape, 3)].norm(dim=1)
    assert float(error.mean()) <= 0.1
    assert float(jacobian_determinant(result.ddf).min()) > 0
    assert float(jacobian_determinant(inverse).min()) > 0


def test_symmetric_model_treats_the_two_images_alike():
    """Swapping the images swaps forward and inverse: registering f to m gives (about) the inverse of m to f."""
    shape = (32, 36, 28)
    a, truth = _scene(shape, 5), _smooth_field(shape, 1.5, seed=6)
    b = warp_image(a, truth)
    forward, backward = _symmetric()(a, b), _symmetric()(b, a)
    inside = ((a[0, 0] > 0.2) & (b[0, 0] > 0.2))[None].expand(3, *shape)
    difference = (forward.ddf[0] - backward.inverse_ddf[0])[inside].abs()
    assert float(difference.mean()) < 0.1


def test_symmetric_model_refuses_a_similarity_that_holds_the_fixed_image_constant():
    class ConstantFixed(torch.nn.Module):  # like the DeepSim losses: the fixed image's features without gradient
        def forward(self, warped, fixed):
            return ((warped - fixed.detach()) ** 2).mean()

    image = _scene((16, 16, 16))
    with pytest.raises(ValueError, match="differentiable in both images"):
        InstanceOptimisation(ConstantFixed(), transform="symmetric", scales=(1,), iterations=(2,))(image, image)


def test_an_unknown_transform_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="greedy, symmetric, svf"):
        InstanceOptimisation(LocalNCCLoss(3, 5), transform="bspline")


# ----------------------------------------------------------------------------------- 3. the pipeline's inverse
def test_registration_inverse_undoes_the_affine_and_the_deformation_in_world_space():
    """Moving = fixed shifted by 4 mm (2 voxels of 2 mm): the inverse sends moving-image points 4 mm back, on a
    grid of its own; the inverse consistency is small."""
    from deepsim.geometry import Grid

    fixed = _scene((40, 40, 40), 3)[0, 0]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving = torch.roll(fixed, shifts=2, dims=0)
    registrar = Registrar(affine=AffineRegistration(), optimiser=_symmetric(iterations=(20, 10)))
    registration = registrar(fixed, affine, moving, affine)
    other = Grid((10, 12, 14), np.array([[1.0, 0, 0, 30], [0, 1.0, 0, 25], [0, 0, 1.0, 30], [0, 0, 0, 1]]))
    y, source = registration.inverse_points(other)
    np.testing.assert_allclose((source - y).mean(dim=(1, 2, 3)).numpy(), [-4.0, 0.0, 0.0], atol=0.25)
    consistency = registration.inverse_consistency()
    assert consistency["mean_voxels"] < 0.1 and consistency["mean_mm"] == pytest.approx(
        2 * consistency["mean_voxels"], rel=1e-4)


# ------------------------------------------------------------------------------------ 4. deepsim register's files
def _world(shape, affine):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *shape)


def _content(p):
    """Blobs defined in world space (mm): a textured image for local NCC."""
    centres = [(-8, 4, 0), (6, -6, 5), (2, 9, -7), (-5, -9, 8), (9, 7, 3), (0, 0, -2)]
    return sum(np.exp(-((p - np.reshape(c, (3, 1, 1, 1))) ** 2).sum(0) / (2 * 4.0**2)) for c in centres)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """``deepsim register --no-network --transform symmetric`` on a pair with a known smooth deformation, the two
    images on different grids (the moving one flipped, coarser, shifted)."""
    from deepsim.cli import main

    folder = tmp_path_factory.mktemp("pair")
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = -24.0
    moving_affine = np.array([[-2.2, 0, 0, 27.0], [0, 2.1, 0, -26.0], [0, 0, 2.3, -25.0], [0, 0, 0, 1]])
    shape, moving_shape = (25, 25, 25), (24, 25, 22)

    def phi(x):  # fixed world -> moving world: a shift and a smooth bend (mm)
        return x + np.stack([1.5 + 1.2 * np.sin(x[1] / 9.0), -1.0 + 0.0 * x[0], 0.8 * np.cos(x[0] / 10.0)])

    y = _world(moving_shape, moving_affine)
    x = y.copy()
    for _ in range(50):
        x = x - (phi(x) - y)
    nib.save(nib.Nifti1Image(_content(_world(shape, fixed_affine)).astype(np.float32), fixed_affine),
             folder / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(_content(x).astype(np.float32), moving_affine), folder / "moving.nii.gz")
    out = folder / "out"
    assert main(["register", "--fixed", str(folder / "fixed.nii.gz"), "--moving", str(folder / "moving.nii.gz"),
                 "--no-network", "--transform", "symmetric", "--out", str(out), "--no-progress"]) == 0
    return {"out": out, "moving_affine": moving_affine, "moving_shape": moving_shape, "fixed_affine": fixed_affine,
            "phi": phi, "x_of_moving": x}


def test_register_writes_the_inverse_on_the_moving_grid_and_reports_its_consistency(registered):
    out = registered["out"]
    inverse = nib.load(out / "ddf_mm_inverse.nii.gz")
    assert inverse.shape == (*registered["moving_shape"], 1, 3)
    np.testing.assert_allclose(inverse.affine, registered["moving_affine"], atol=1e-5)
    report = json.loads((out / "registration.json").read_text())
    assert report["instance_optimisation"]["transform"] == "symmetric"
    assert report["outputs"]["ddf_mm_inverse"] == "ddf_mm_inverse.nii.gz"
    consistency = report["inverse_consistency"]
    assert set(consistency) == {"mean_voxels", "max_voxels", "mean_mm", "max_mm"}
    assert consistency["mean_voxels"] <= 0.1


def test_the_written_inverse_maps_moving_points_near_their_true_source(registered):
    """y + d(y) (nibabel, RAS) is close to the true φ⁻¹(y) where the moving image has content."""
    from deepsim.io import load_displacement

    d_mm, _ = load_displacement(registered["out"] / "ddf_mm_inverse.nii.gz")
    y = _world(registered["moving_shape"], registered["moving_affine"])
    content = _content(registered["x_of_moving"]) > 0.2
    error = np.linalg.norm(y + d_mm - registered["x_of_moving"], axis=0)[content]
    start = np.linalg.norm(y - registered["x_of_moving"], axis=0)[content]
    assert error.mean() < 0.3 * start.mean()


def test_itk_reads_the_inverse_field_as_ours_and_it_undoes_the_forward_field(registered):
    """ITK's DisplacementFieldTransform on ddf_mm_inverse.nii.gz sends moving points where ours does; then the
    forward field (ddf_mm.nii.gz, also through ITK) brings them back near where they started."""
    import itk

    from deepsim.io import load_displacement

    out = registered["out"]
    d_mm, _ = load_displacement(out / "ddf_mm_inverse.nii.gz")
    y = _world(registered["moving_shape"], registered["moving_affine"])

    def itk_transform(path):
        field = itk.imread(str(path))  # itk.Image[itk.Vector[itk.F, 3], 3]
        transform = itk.DisplacementFieldTransform[itk.F, 3].New()
        transform.SetDisplacementField(field)
        return transform

    inverse, forward = itk_transform(out / "ddf_mm_inverse.nii.gz"), itk_transform(out / "ddf_mm.nii.gz")
    lps = np.array([-1.0, -1.0, 1.0])
    rng = np.random.default_rng(0)
    index = [tuple(rng.integers(4, n - 4) for n in registered["moving_shape"]) for _ in range(40)]
    for i in index:
        point = y[(slice(None), *i)]
        mapped = np.asarray(inverse.TransformPoint((point * lps).tolist())) * lps
        np.testing.assert_allclose(mapped, point + d_mm[(slice(None), *i)], atol=1e-3)
        back = np.asarray(forward.TransformPoint((mapped * lps).tolist())) * lps
        assert np.linalg.norm(back - point) < 0.3  # mm (voxels of 2 mm)


def test_the_symmetric_model_with_a_deepsim_loss_is_refused_before_any_work():
    from deepsim.errors import ConfigError
    from deepsim.registration.inference import _instance_optimiser

    with pytest.raises(ConfigError, match="symmetric cannot use the loss deepsim-seg"):
        _instance_optimiser(None, "deepsim-seg", 3, None, None, torch.device("cpu"), "symmetric")


@pytest.mark.parametrize("loss", ["ncc", "mse", "mind", "nmi"])
def test_the_default_transform_is_greedy_for_every_intensity_loss(loss):
    """The rule as shipped (docs/instance_optimisation.md): no --transform means greedy, whatever the loss."""
    from deepsim.registration.inference import _instance_optimiser
    from deepsim.registration.instance import DEFAULT_TRANSFORM

    assert DEFAULT_TRANSFORM == "greedy"
    assert _instance_optimiser(None, loss, 3, None, None, torch.device("cpu")).transform == "greedy"


def test_deepsim_losses_stay_greedy_even_when_the_default_is_symmetric(monkeypatch):
    """The rule's exception: a loss that holds the fixed image's features constant gets greedy when the default
    is symmetric, and the intensity losses get the default."""
    import deepsim.registration.instance as instance
    from deepsim.features.networks import build_feature_net
    from deepsim.losses.deepsim import DeepSimLoss

    deepsim_loss = DeepSimLoss(build_feature_net("ae", 3, channels=(4, 8)))
    assert instance.default_transform(deepsim_loss) == "greedy"
    monkeypatch.setattr(instance, "DEFAULT_TRANSFORM", "symmetric")
    assert instance.default_transform(deepsim_loss) == "greedy"
    assert InstanceOptimisation(deepsim_loss).transform == "greedy"
    assert InstanceOptimisation(LocalNCCLoss(3, 5)).transform == "symmetric"


def _one_line_error(capsys, argv, code, error, expected):
    """``deepsim`` with ``argv`` returns ``code`` and prints exactly one stderr line ``deepsim: error: <error>: ...``
    holding ``expected``, nothing on stdout."""
    from deepsim.cli import main

    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith(f"deepsim: error: {error}: ") and expected in captured.err, captured.err


def test_transform_with_network_only_is_a_one_line_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    _one_line_error(capsys, ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--network-only",
                             "--transform", "symmetric", "--out", str(out)], 2, "UsageError",
                    "--transform symmetric names the instance optimisation's model, which --network-only skips")
    assert not out.exists()


@pytest.mark.parametrize("options, expected", [
    (["--no-network", "--loss", "deepsim-seg", "--transform", "symmetric"],
     "--transform symmetric cannot use the loss deepsim-seg"),
    (["--no-network", "--iterations", "0", "--transform", "svf"],
     "--transform svf names the instance optimisation's model, but --iterations 0 turns"),
])
def test_refused_transform_combinations_are_one_line_and_write_nothing(registered, tmp_path, capsys, options,
                                                                       expected):
    folder = registered["out"].parent
    out = tmp_path / "refused"
    before = set(tmp_path.iterdir())
    _one_line_error(capsys, ["register", "--fixed", str(folder / "fixed.nii.gz"), "--moving",
                             str(folder / "moving.nii.gz"), *options, "--out", str(out), "--no-progress"], 1,
                    "ConfigError", expected)
    assert set(tmp_path.iterdir()) == before
