"""``deepsim register``: user images of any grid in, outputs on the fixed grid; ITK-readable field; bad inputs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

from deepsim.cli import main
from deepsim.engine.checkpoints import save_checkpoint
from deepsim.errors import CheckpointError, ConfigError, DatasetError
from deepsim.features.networks import build_feature_net
from deepsim.io import load_displacement
from deepsim.registration.inference import register_files
from deepsim.registration.model import resolve_model
from deepsim.registration.network import RegistrationNet

LABELS = {0, 7, 1002, 2035}


# ----------------------------------------------------------------------------------------------------- helpers
def _save_model(path: Path, spatial_dims: int = 3, channels=(4, 8, 8), half_res: bool = False,
                spacing_mm: float | None = 2.0, similarity: str | None = "mse") -> Path:
    """An untrained registration net (its flow head starts near zero: ~identity) saved as a checkpoint."""
    kwargs = dict(spatial_dims=spatial_dims, in_channels=1, channels=list(channels), half_res=half_res)
    meta = {"regularization_weight": 0.01}
    if similarity is not None:
        meta["similarity"] = similarity
    if spacing_mm is not None:
        meta["spacing_mm"] = spacing_mm
    with torch.random.fork_rng():  # the same weights every run, the global generator untouched
        torch.manual_seed(0)
        net = RegistrationNet(**kwargs)
    return save_checkpoint(path, net, "registration_net", kwargs, meta=meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Untrained MSE models (2 mm, size multiple 4): {3: 3D model, 2: 2D model at 1 mm}."""
    folder = tmp_path_factory.mktemp("models")
    return {3: _save_model(folder / "3d" / "registration_mse.pt"),
            2: _save_model(folder / "2d" / "registration_mse.pt", spatial_dims=2, spacing_mm=1.0)}


def _world(shape, affine) -> np.ndarray:
    """RAS world coordinates (ndim, *shape) of every voxel (2D images: the in-plane block of the affine)."""
    nd = len(shape)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(nd, -1)
    return (affine[:nd, :nd] @ index + affine[:nd, 3:4]).reshape(nd, *shape)


def _waves(p: np.ndarray) -> np.ndarray:
    """A smooth test image (products of sines, values in [0.5, 3.5]) defined in world space (2D or 3D points)."""
    if p.shape[0] == 2:
        return np.sin(p[0] / 5.0) * np.cos(p[1] / 4.0) + 2.0
    return np.sin(p[0] / 7.0) * np.cos(p[1] / 9.0) + 0.5 * np.sin(p[2] / 6.0 + p[0] / 11.0) + 2.0


def _labels(p: np.ndarray) -> np.ndarray:
    """Label map defined in world space with the values of LABELS, each region several voxels wide."""
    lab = np.zeros(p.shape[1:], np.int16)
    lab[p[0] > 0] = 7
    lab[p[1] > 5] = 1002
    lab[(p[2] > 8) & (p[0] < -3)] = 2035
    return lab


def _save(path: Path, array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, affine, header=header), str(path))
    return path


def _oblique(theta: float, spacing=(1.6, 1.2, 2.1), origin=(-15.0, -20.0, -25.0)) -> np.ndarray:
    """Rotated about z by theta and about x by 0.2 rad, anisotropic spacing."""
    rz = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _diag(spacing, origin) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


FIXED_AFFINES = {"RAS": _diag((1.8, 1.8, 1.8), (-25.0, -25.0, -25.0)),
                 "LPS": _diag((-1.5, -1.7, 2.0), (25.0, 25.0, -25.0)),
                 "oblique": _oblique(0.4)}
# the moving image's own grid: flipped y, other spacing, larger field of view than every fixed image above
MOVING_AFFINE, MOVING_SHAPE = _diag((1.3, -1.4, 1.6), (-40.0, 40.0, -40.0)), (60, 58, 52)


def _inside_box(target_ras: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """Where world points (3, *S) fall strictly inside the voxel-centre box of an image (affine, shape)."""
    voxel = np.einsum("ij,j...->i...", np.linalg.inv(affine[:3, :3]), target_ras - affine[:3, 3].reshape(3, 1, 1, 1))
    upper = np.asarray(shape).reshape(3, 1, 1, 1) - 1
    return np.all((voxel > 0) & (voxel < upper), axis=0)


def _phantom(p: np.ndarray) -> np.ndarray:
    """A textured ellipsoid (17 x 14 x 20 mm radii) on a zero background near the centre of FIXED_AFFINES'
    oblique grid: an image Mattes mutual information aligns robustly (no periodicity to lock onto)."""
    centre = np.array([0.3, -0.7, 4.2]).reshape(3, 1, 1, 1)
    r = np.sqrt((((p - centre) / np.array([17.0, 14.0, 20.0]).reshape(3, 1, 1, 1)) ** 2).sum(0))
    return (1.5 + np.sin(p[0] / 5.0) * np.cos(p[1] / 6.0) + 0.5 * np.sin(p[2] / 4.0)) / (1 + np.exp(12 * (r - 1)))


def _deformed_pair(folder: Path, fixed_affine: np.ndarray, fixed_shape, content=_waves):
    """Fixed image on its grid; moving = the same content moved by a known transform, on MOVING_AFFINE's grid.

    Fixed point x maps to phi(x) = x + t + s(x) in the moving image (t = (3, -2, 1.5) mm, s smooth, up to 1.5 mm),
    so moving(phi(x)) = fixed(x). Returns (fixed path, moving path, true displacement (3, *fixed_shape) RAS mm).
    """
    folder.mkdir(parents=True, exist_ok=True)
    t = np.array([3.0, -2.0, 1.5]).reshape(3, 1, 1, 1)

    def s(p):
        return np.stack([1.5 * np.sin(p[1] / 10.0), np.zeros(p.shape[1:]), np.cos(p[0] / 12.0)])

    y = _world(MOVING_SHAPE, MOVING_AFFINE)
    x = y - t
    for _ in range(40):  # invert phi by fixed-point iteration: |ds/dx| <= 0.15, so 40 steps reach 1e-30 mm
        x = y - t - s(x)
    assert np.abs(x + t + s(x) - y).max() < 1e-9
    fixed = _save(folder / "fixed.nii.gz", content(_world(fixed_shape, fixed_affine)).astype(np.float32), fixed_affine)
    moving = _save(folder / "moving.nii.gz", content(x).astype(np.float32), MOVING_AFFINE)
    xf = _world(fixed_shape, fixed_affine)
    return fixed, moving, t + s(xf)


# --------------------------------------------------------------------------------- 1. geometry of the outputs
@pytest.mark.parametrize("name", list(FIXED_AFFINES))
def test_outputs_lie_on_the_fixed_grid_keep_its_header_and_label_values(tmp_path, models, capsys, name):
    """Every output carries the fixed affine and shape; warped keeps the fixed header; with the ~identity model alone
    (--network-only) the warped image is the moving image read at the fixed voxels' world points, and the labels
    keep their values."""
    fixed_affine, fixed_shape = FIXED_AFFINES[name], (28, 30, 26)
    header = nib.Nifti1Header()
    header["descrip"] = b"deepsim fixed test header"
    header.set_xyzt_units("mm", "msec")
    xf = _world(fixed_shape, fixed_affine)
    fixed = _save(tmp_path / "f.nii.gz", _waves(xf).astype(np.float32), fixed_affine, header)
    fixed_label = _save(tmp_path / "fl.nii.gz", _labels(xf), fixed_affine)
    moving_array = _waves(_world(MOVING_SHAPE, MOVING_AFFINE)).astype(np.float32)
    moving = _save(tmp_path / "m.nii.gz", moving_array, MOVING_AFFINE)
    moving_labels = _labels(_world(MOVING_SHAPE, MOVING_AFFINE))
    moving_label = _save(tmp_path / "ml.nii.gz", moving_labels, MOVING_AFFINE)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(models[3]),
                 "--fixed-label", str(fixed_label), "--moving-label", str(moving_label), "--out", str(out),
                 "--network-only", "--no-progress"]) == 0
    assert "dice_before" in capsys.readouterr().out

    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".deepsim")) == sorted(
        ["warped.nii.gz", "ddf_mm.nii.gz", "ddf_mm_inverse.nii.gz", "jacobian_det.nii.gz", "warped_label.nii.gz",
         "registration.json"])
    expected_shapes = {"warped": fixed_shape, "ddf_mm": (*fixed_shape, 1, 3), "jacobian_det": fixed_shape,
                       "warped_label": fixed_shape}
    for stem, shape in expected_shapes.items():
        img = nib.load(out / f"{stem}.nii.gz")
        assert img.shape == shape, stem
        assert np.abs(img.affine - fixed_affine).max() < 1e-6, stem  # measured 4.8e-8 (float32 sform)
    inverse = nib.load(out / "ddf_mm_inverse.nii.gz")  # the inverse lies on the moving image's grid
    assert inverse.shape == (*MOVING_SHAPE, 1, 3) and np.abs(inverse.affine - MOVING_AFFINE).max() < 1e-6
    warped_img = nib.load(out / "warped.nii.gz")
    assert warped_img.header["descrip"].tobytes().rstrip(b"\0") == b"deepsim fixed test header"
    assert warped_img.header.get_xyzt_units() == ("mm", "msec")

    # the ~identity model: warped(x) = moving(x) read at x's world point, as scipy interpolates it in voxel space
    voxel = np.einsum("ij,j...->i...", np.linalg.inv(MOVING_AFFINE[:3, :3]), xf - MOVING_AFFINE[:3, 3:4, None, None])
    expected = ndi.map_coordinates(moving_array, voxel.reshape(3, -1), order=1).reshape(fixed_shape)
    assert np.abs(warped_img.get_fdata() - expected).max() < 1e-4  # measured 3.8e-6 - 4.5e-6 (float32)
    warped_labels = np.asarray(nib.load(out / "warped_label.nii.gz").dataobj)
    assert set(np.unique(warped_labels)) == LABELS
    nearest = ndi.map_coordinates(moving_labels, voxel.reshape(3, -1), order=0).reshape(fixed_shape)
    no_tie = np.all(np.abs(np.abs(voxel - np.round(voxel)) - 0.5) > 0.01, axis=0)  # rounding is unambiguous there
    assert no_tie.mean() > 0.8 and np.array_equal(warped_labels[no_tie], nearest[no_tie])
    assert np.abs(nib.load(out / "jacobian_det.nii.gz").get_fdata() - 1).max() < 1e-3  # measured 8.6e-6 - 1.5e-5

    report = json.loads((out / "registration.json").read_text())
    assert report["dice_before"] > 0.8  # the label maps are the same world regions, discretised on two grids
    assert report["dice_after"] == pytest.approx(report["dice_before"], abs=1e-3)
    assert report["folding_pct"] == 0.0 and report["std_log_jacobian"] < 1e-3
    assert report["jacobian_mask"] == "fixed label > 0" and report["model"] == str(models[3])


def test_warped_label_values_are_a_subset_of_the_moving_ones_under_a_real_deformation(tmp_path, models):
    """Nearest-neighbour label warping through a refined (non-identity) field never invents values, even int32."""
    fixed, moving, _ = _deformed_pair(tmp_path, FIXED_AFFINES["LPS"], (28, 30, 26))
    labels = _labels(_world(MOVING_SHAPE, MOVING_AFFINE)).astype(np.int32)
    labels[labels == 2035] = 70000  # beyond int16: must be written as int32, not wrapped
    moving_label = _save(tmp_path / "ml.nii.gz", labels, MOVING_AFFINE)
    written = register_files(fixed, moving, tmp_path / "out", model=models[3], moving_label=moving_label,
                             iterations=30, progress=False)
    warped = np.asarray(nib.load(written["warped_label"]).dataobj)
    assert set(np.unique(warped)) <= {0, 7, 1002, 70000} and 70000 in warped
    assert nib.load(written["warped_label"]).get_data_dtype() == np.int32
    assert np.linalg.norm(load_displacement(written["ddf_mm"])[0], axis=0).mean() > 2.0  # not ~0: measured 3.75 mm


# ------------------------------------------------------------------------------------- 2. SimpleITK agreement
# the oblique grid at half its spacing (56x60x52 voxels): the affine pre-alignment subsamples by 8 and draws 10 % of
# the voxels, and on the 28x30x26 grid that left so few samples that SimpleITK sometimes raised (see the report)
FINE_OBLIQUE, FINE_SHAPE = _oblique(0.4, spacing=(0.8, 0.6, 1.05)), (56, 60, 52)


@pytest.mark.parametrize("options", [{}, {"iterations": 0}], ids=["default", "affine-and-network"])
def test_simpleitk_resampling_through_ddf_mm_reproduces_warped(tmp_path, models, options):
    """ddf_mm.nii.gz as ITK's DisplacementFieldTransform + Resample gives warped.nii.gz (oblique fixed grid, moving
    on another grid, non-trivial field: the default stages, or affine + the untrained network alone); affine.tfm,
    written without SimpleITK, is read by it and maps the fixed points as the affine of the report does."""
    fixed, moving, _ = _deformed_pair(tmp_path, FINE_OBLIQUE, FINE_SHAPE, content=_phantom)
    written = register_files(fixed, moving, tmp_path / "out", model=models[3], progress=False, **options)
    ddf, _ = load_displacement(written["ddf_mm"])
    assert np.linalg.norm(ddf, axis=0).mean() > 2.0  # a real transform

    field = sitk.Cast(sitk.ReadImage(str(written["ddf_mm"])), sitk.sitkVectorFloat64)
    itk = sitk.Resample(sitk.ReadImage(str(moving)), sitk.ReadImage(str(fixed)), sitk.DisplacementFieldTransform(field),
                        sitk.sitkLinear, 0.0)
    itk = np.transpose(sitk.GetArrayFromImage(itk), (2, 1, 0))
    ours = nib.load(written["warped"]).get_fdata()
    # compare where x + d(x) is strictly inside the moving voxel-centre box (ITK reads up to half a voxel beyond it,
    # where torch blends with the zero outside)
    xf = _world(FINE_SHAPE, FINE_OBLIQUE)
    inside = _inside_box(xf + ddf, MOVING_AFFINE, MOVING_SHAPE)
    assert inside.mean() > 0.8  # measured 1.0: the moving image covers the fixed one
    # intensity range 2.5; measured max difference 1.4e-6 (instance-opt) and 1.2e-6 (affine): float32 rounding
    assert np.abs(itk[inside] - ours[inside]).max() < 1e-4

    if options.get("iterations") == 0:
        report = json.loads(written["report"].read_text())
        transform = sitk.ReadTransform(str(written["affine"]))
        lps = xf.reshape(3, -1).T * np.array([-1.0, -1.0, 1.0])
        mapped = np.array([transform.TransformPoint(tuple(p)) for p in lps]) * np.array([-1.0, -1.0, 1.0])
        a = np.asarray(report["affine_ras"])
        assert np.abs(mapped.T - (a[:3, :3] @ xf.reshape(3, -1) + a[:3, 3:])).max() < 1e-6  # same matrix, RAS
        # the untrained net adds ~0: the field is the affine alone (measured 3e-5 mm, float32 storage)
        assert np.abs(mapped.T.reshape(xf.shape) - (xf + ddf)).max() < 1e-2
        det = nib.load(written["jacobian_det"]).get_fdata()
        assert np.abs(det - np.linalg.det(a[:3, :3])).max() < 1e-3  # measured 1.5e-5


def test_affine_prealignment_is_reproducible(tmp_path, models):
    """The same pair registered three times gives the same affine (and the same field)."""
    fixed, moving, _ = _deformed_pair(tmp_path, FINE_OBLIQUE, FINE_SHAPE, content=_phantom)
    affines = [np.asarray(json.loads(register_files(fixed, moving, tmp_path / f"out{i}", model=models[3],
                                                    iterations=0, progress=False)["report"].read_text())["affine_ras"])
               for i in range(3)]
    assert np.abs(affines[1] - affines[0]).max() < 1e-9 and np.abs(affines[2] - affines[0]).max() < 1e-9


# -------------------------------------------------------------------------- 3. known deformation is recovered
LPS_32 = _diag((-2.0, -2.0, 2.0), (31.0, 31.0, -31.0))  # 32^3 at the model's 2 mm, x and y flipped: no padding


def _endpoint_errors(folder: Path, fixed_affine: np.ndarray, fixed_shape, models, iterations: int):
    """(identity's, registration's) mean endpoint error in mm over voxels 4+ from the border, for _deformed_pair."""
    fixed, moving, truth = _deformed_pair(folder, fixed_affine, fixed_shape)
    written = register_files(fixed, moving, folder / "out", model=models[3], iterations=iterations, progress=False)
    ddf, affine = load_displacement(written["ddf_mm"])
    assert np.allclose(affine, fixed_affine, atol=1e-6)
    interior = (slice(None),) + (slice(4, -4),) * 3
    report = json.loads(written["report"].read_text())
    assert report["stages"] == ["affine", "network", "instance_optimisation"]
    assert report["instance_optimisation"]["iterations"] == [iterations] * 3
    return (np.linalg.norm(truth[interior], axis=0).mean(),
            np.linalg.norm(ddf[interior] - truth[interior], axis=0).mean())


@pytest.fixture(scope="module")
def unpadded_errors(tmp_path_factory, models) -> tuple[float, float]:
    """_endpoint_errors on the 32^3 LPS grid (working grid = fixed grid), 100 steps a level: run once, used twice."""
    return _endpoint_errors(tmp_path_factory.mktemp("unpadded"), LPS_32, (32, 32, 32), models, iterations=100)


def test_instance_optimisation_recovers_a_known_deformation(unpadded_errors):
    """Affine + untrained MSE model + instance optimisation (MSE, its own loss): the endpoint error of ddf_mm
    against the true transform ((3, -2, 1.5) mm shift plus a smooth wave of up to 1.5 mm; moving on another grid,
    fixed with flipped axes) drops far below the identity's."""
    identity_error, error = unpadded_errors
    assert identity_error > 3.0 and error < 0.15 * identity_error


def test_padding_the_working_grid_does_not_bias_the_recovered_deformation(tmp_path, models, unpadded_errors):
    """The same content and deformation on a 29^3 fixed grid (working grid padded to 32^3: 1.5 voxels of padding
    a side) is recovered about as well as on the 32^3 grid that needs no padding: the padding repeats the fixed
    image's border (zeros there, against moving content, biased the whole field)."""
    unpadded = unpadded_errors[1]
    _, padded = _endpoint_errors(tmp_path, _diag((-2.0, -2.0, 2.0), (28.0, 28.0, -28.0)), (29, 29, 29), models,
                                 iterations=100)
    assert padded < unpadded + 0.15


# -------------------------------------------------------------- 4. sizes the network does not accept, anisotropy
@pytest.mark.parametrize("half_res, multiple", [(False, 4), (True, 8)])
def test_non_divisible_anisotropic_images_register_on_their_own_grid(tmp_path, half_res, multiple):
    """A 37x41x29 image at (0.8, 1.3, 2.5) mm: the working grid at 2 mm is padded to the network's multiple and
    covers the image; outputs come back at 37x41x29; registering the image to itself gives it back."""
    model = _save_model(tmp_path / "registration_mse.pt", half_res=half_res)
    shape, affine = (37, 41, 29), _diag((0.8, 1.3, 2.5), (-10.0, 20.0, 0.0))
    image = _waves(_world(shape, affine)).astype(np.float32)
    path = _save(tmp_path / "img.nii.gz", image, affine)
    written = register_files(path, path, tmp_path / "out", model=model, affine=False, iterations=0, progress=False)
    for name in ("warped", "jacobian_det"):
        assert nib.load(written[name]).shape == shape
    assert nib.load(written["ddf_mm"]).shape == (*shape, 1, 3)
    report = json.loads(written["report"].read_text())
    grid = np.array(report["working_grid"])
    assert np.all(grid % multiple == 0)
    extent = np.array([36 * 0.8, 40 * 1.3, 28 * 2.5])
    assert np.all((grid - 1) * 2.0 >= extent) and np.all((grid - 1 - multiple) * 2.0 < extent)  # covers, not more
    assert np.abs(nib.load(written["warped"]).get_fdata() - image).max() < 1e-3  # measured 5.0e-5 / 5.8e-5


# ------------------------------------------------------------------------------------------------------- 5. 2D
@pytest.mark.parametrize("trailing_axis", [False, True], ids=["HxW", "HxWx1"])
def test_2d_images_register_with_a_2d_model(tmp_path, models, trailing_axis):
    """2D images, stored (H, W) or (H, W, 1), on different grids: outputs are 2D on the fixed grid, ddf_mm is
    (H, W, 1, 1, 2), and instance optimisation recovers a (2, -1.5) mm shift."""
    fixed_affine, fixed_shape = _diag((-0.9, 1.1, 1.0), (20.0, -18.0, 0.0)), (45, 33)
    moving_affine, moving_shape = _diag((1.2, 0.8, 3.0), (-25.0, -20.0, 0.0)), (40, 50)
    shift = np.array([2.0, -1.5]).reshape(2, 1, 1)
    fixed_array = _waves(_world(fixed_shape, fixed_affine)).astype(np.float32)
    moving_array = _waves(_world(moving_shape, moving_affine) - shift).astype(np.float32)
    moving_labels = np.where(_world(moving_shape, moving_affine)[0] > 0, 2035, 7).astype(np.int16)
    if trailing_axis:
        fixed_array, moving_array, moving_labels = (a[..., None] for a in (fixed_array, moving_array, moving_labels))
    fixed = _save(tmp_path / "f.nii.gz", fixed_array, fixed_affine)
    moving = _save(tmp_path / "m.nii.gz", moving_array, moving_affine)
    moving_label = _save(tmp_path / "ml.nii.gz", moving_labels, moving_affine)
    written = register_files(fixed, moving, tmp_path / "out", model=models[2], moving_label=moving_label,
                             iterations=150, progress=False)
    for name in ("warped", "jacobian_det", "warped_label"):
        img = nib.load(written[name])
        assert img.shape == fixed_shape and np.abs(img.affine - fixed_affine).max() < 1e-6, name
    assert set(np.unique(np.asarray(nib.load(written["warped_label"]).dataobj))) == {7, 2035}
    assert nib.load(written["ddf_mm"]).shape == (*fixed_shape, 1, 1, 2)
    ddf, _ = load_displacement(written["ddf_mm"])
    error = np.linalg.norm(ddf[:, 5:-5, 5:-5] - shift, axis=0).mean()
    assert error < 0.3  # identity's error is 2.5 mm; measured 0.04 mm
    assert json.loads(written["report"].read_text())["working_grid"] == [40, 36]  # 39.6 x 35.2 mm at 1 mm, /4


def test_a_coronal_2d_slice_is_refused_in_one_line(tmp_path, models, capsys):
    """A 2D slice whose second axis runs along z (stored (H, W, 1), as cut from a 3D scan) has no x-y geometry:
    a one-line DatasetError naming it, not a LinAlgError traceback from a singular 2x2 block."""
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    image = _save(tmp_path / "cor.nii.gz", np.random.default_rng(0).random((30, 30, 1)).astype(np.float32), coronal)
    rc = main(["register", "--fixed", str(image), "--moving", str(image), "--model", str(models[2]),
               "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith(f"deepsim: error: DatasetError: {image}: "), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 6. bad inputs
BAD_CASES = ["missing file", "text file", "truncated gzip", "4D image", "3D fixed + 2D moving", "NaN voxels",
             "constant image", "2D model, 3D images", "label on another grid", "non-integer labels",
             "corrupted checkpoint", "checkpoint path absent", "iterations for 4 levels", "feature net as model"]


def _good_options(tmp: Path, models: dict[int, Path]) -> dict:
    """Options of a valid `deepsim register` call: two random 12^3 images and the 3D model."""
    rng = np.random.default_rng(0)
    fixed = _save(tmp / "fixed.nii.gz", rng.random((12, 12, 12)).astype(np.float32), np.eye(4))
    moving = _save(tmp / "moving.nii.gz", rng.random((12, 12, 12)).astype(np.float32), np.eye(4))
    return {"--fixed": fixed, "--moving": moving, "--model": models[3]}


def _bad_case(case: str, tmp: Path, models: dict[int, Path]) -> tuple[dict, str, type]:
    """(options for `deepsim register`, text the error line must contain, error class) of one bad input."""
    rng = np.random.default_rng(1)
    opts = _good_options(tmp, models)
    fixed, moving = opts["--fixed"], opts["--moving"]
    bad = tmp / "bad.nii.gz"
    if case == "missing file":
        opts["--moving"] = bad
    elif case == "text file":
        bad.write_text("this is not an image\n")
        opts["--moving"] = bad
    elif case == "truncated gzip":
        raw = moving.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
        opts["--moving"] = bad
    elif case == "4D image":
        opts["--fixed"] = _save(bad, rng.random((8, 8, 8, 3)).astype(np.float32), np.eye(4))
    elif case == "3D fixed + 2D moving":
        opts["--moving"] = _save(bad, rng.random((12, 12)).astype(np.float32), np.eye(4))
    elif case == "NaN voxels":
        array = rng.random((12, 12, 12)).astype(np.float32)
        array[3, 4, 5] = np.nan
        opts["--moving"] = _save(bad, array, np.eye(4))
    elif case == "constant image":
        opts["--fixed"] = _save(bad, np.full((12, 12, 12), 5.0, np.float32), np.eye(4))
    elif case == "2D model, 3D images":
        opts["--model"] = models[2]
        return opts, f"{fixed}: a 3D image, but the model", DatasetError
    elif case == "label on another grid":
        opts["--fixed-label"] = _save(bad, np.zeros((10, 12, 12), np.int16), np.eye(4))
    elif case == "non-integer labels":
        opts["--moving-label"] = _save(bad, rng.random((12, 12, 12)).astype(np.float32) * 3, np.eye(4))
    elif case in ("corrupted checkpoint", "checkpoint path absent"):
        bad = tmp / "registration_mse.pt"
        if case == "corrupted checkpoint":
            raw = models[3].read_bytes()
            bad.write_bytes(raw[: len(raw) // 2])
        opts["--model"] = bad
        return opts, str(bad), CheckpointError
    elif case == "iterations for 4 levels":
        return {**opts, "--iterations": [5, 5, 5, 5]}, "--iterations takes 1 or 3 numbers", ConfigError
    elif case == "feature net as model":
        bad = save_checkpoint(tmp / "feature_ae.pt", build_feature_net("ae", 3, 1, channels=[4, 8]), "feature_net",
                              {"kind": "ae", "spatial_dims": 3, "in_channels": 1, "channels": [4, 8]})
        opts["--model"] = bad
        return opts, f"{bad}: a feature_net checkpoint, not a registration network", CheckpointError
    else:
        raise AssertionError(case)
    return opts, f"{bad}: ", DatasetError


def _argv(opts: dict, out: Path) -> list[str]:
    argv = ["register", "--out", str(out)]
    for key, value in opts.items():
        argv += [key] if value is None else [key, *map(str, value)] if isinstance(value, list) else [key, str(value)]
    return argv


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_1_with_one_line_naming_it_and_writes_nothing(tmp_path, models, capsys, case):
    """Each bad input: return code 1, exactly one stderr line naming the file (or option) and the problem, nothing
    on stdout, and neither the --out folder nor a staging folder beside it exists afterwards."""
    opts, expected, error = _bad_case(case, tmp_path, models)
    out = tmp_path / "results" / "reg"
    before = set(tmp_path.iterdir())
    assert main(_argv(opts, out)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert captured.err.startswith(f"deepsim: error: {error.__name__}: ") and expected in captured.err, captured.err
    assert not out.exists() and set(tmp_path.iterdir()) == before


def test_bad_input_error_is_one_line_on_the_real_command_line(tmp_path, models):
    """Run as a process (model loaded, MONAI imported): stderr holds the error line and nothing else."""
    opts, expected, _ = _bad_case("2D model, 3D images", tmp_path, models)
    proc = subprocess.run([sys.executable, "-m", "deepsim.cli", *_argv(opts, tmp_path / "out")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("deepsim: error: DatasetError: ") and \
        expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_leaves_no_output_folder(tmp_path, models, monkeypatch):
    """Outputs are staged: if writing the third file fails, no --out folder and no staging folder remain."""
    from deepsim.registration import inference

    fixed, moving, _ = _deformed_pair(tmp_path, FIXED_AFFINES["RAS"], (20, 20, 20))
    label = _save(tmp_path / "ml.nii.gz", _labels(_world(MOVING_SHAPE, MOVING_AFFINE)), MOVING_AFFINE)
    calls = []

    def failing_save_volume(path, array, affine, **kwargs):
        calls.append(Path(path).name)
        if Path(path).name == "warped_label.nii.gz":
            raise OSError("No space left on device")
        return save_volume(path, array, affine, **kwargs)

    save_volume = inference.save_volume
    monkeypatch.setattr(inference, "save_volume", failing_save_volume)
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError, match="No space left"):
        register_files(fixed, moving, tmp_path / "out", model=models[3], moving_label=label, progress=False)
    # both save_volume outputs were attempted (the outputs are written two at a time, so their order varies);
    # warped and ddf_mm (other writers) were written before the failure
    assert sorted(calls) == ["jacobian_det.nii.gz", "warped_label.nii.gz"]
    assert not (tmp_path / "out").exists() and set(tmp_path.iterdir()) == before


def test_missing_spacing_error_is_one_line_naming_the_checkpoint(tmp_path, models, capsys):
    """A checkpoint that does not record its training spacing is refused in one line naming it."""
    model = _save_model(tmp_path / "registration_mse.pt", spacing_mm=None)
    opts = {**_good_options(tmp_path, models), "--model": model}
    assert main(_argv(opts, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"CheckpointError: {model}: the checkpoint does not record its training " in err


def test_the_spacing_option_that_the_missing_spacing_error_suggests_exists(tmp_path, models):
    """The advice in the missing-spacing error can be followed: --spacing makes the checkpoint usable, and it
    sets the working grid (12 voxels of 1 mm at 2.5 mm: 5 voxels, padded to 8)."""
    model = _save_model(tmp_path / "registration_mse.pt", spacing_mm=None)
    opts = {**_good_options(tmp_path, models), "--model": model, "--spacing": 2.5}
    assert main(_argv(opts, tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert report["model_spacing_mm"] == 2.5 and report["working_grid"] == [8, 8, 8]


# ------------------------------------------------------------------------------------------ 7. model resolution
def test_resolve_model_from_a_folder_its_models_subfolder_and_by_similarity(tmp_path):
    """One registration_*.pt in a folder (or its models/) is found; two need `similarity`, else a ConfigError
    that names --similarity; an absent similarity or an empty folder is a CheckpointError."""
    single = _save_model(tmp_path / "one" / "registration_mse.pt")
    model = resolve_model(tmp_path / "one")
    assert model.checkpoint == single and model.spacing_mm == 2.0 and model.similarity == "mse"
    assert model.size_multiple == 4 and model.spatial_dims == 3 and not model.network.training
    nested = _save_model(tmp_path / "run" / "models" / "registration_mse.pt")
    assert resolve_model(str(tmp_path / "run")).checkpoint == nested

    _save_model(tmp_path / "two" / "registration_mse.pt")
    ncc = _save_model(tmp_path / "two" / "registration_ncc.pt", similarity="ncc", spacing_mm=1.5)
    with pytest.raises(ConfigError, match="--similarity") as info:
        resolve_model(tmp_path / "two")
    assert "registration_mse.pt" in str(info.value) and "registration_ncc.pt" in str(info.value)
    chosen = resolve_model(tmp_path / "two", similarity="ncc")
    assert chosen.checkpoint == ncc and chosen.similarity == "ncc" and chosen.spacing_mm == 1.5
    with pytest.raises(CheckpointError, match="no registration_mind.pt"):
        resolve_model(tmp_path / "two", similarity="mind")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no registration_\*\.pt in it or in its models/ folder"):
        resolve_model(tmp_path / "empty")


def test_resolve_model_refuses_a_feature_net_checkpoint(tmp_path):
    """A feature-net checkpoint given as the model is a CheckpointError, not a crash in the network code."""
    path = save_checkpoint(tmp_path / "feature_ae.pt", build_feature_net("ae", 3, 1, channels=[4, 8]), "feature_net",
                           {"kind": "ae", "spatial_dims": 3, "in_channels": 1, "channels": [4, 8]})
    with pytest.raises(CheckpointError, match="not a registration network"):
        resolve_model(path)


def test_cli_similarity_picks_one_model_of_a_folder(tmp_path, models, capsys):
    """`--model FOLDER --similarity ncc` registers with registration_ncc.pt; without --similarity: exit 1."""
    _save_model(tmp_path / "m" / "registration_mse.pt")
    ncc = _save_model(tmp_path / "m" / "registration_ncc.pt", similarity="ncc")
    opts = {**_good_options(tmp_path, models), "--model": tmp_path / "m"}
    assert main(_argv(opts, tmp_path / "a")) == 1
    assert "choose one with --similarity" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(_argv({**opts, "--similarity": "ncc"}, tmp_path / "b")) == 0
    assert json.loads((tmp_path / "b" / "registration.json").read_text())["model"] == str(ncc)


# --------------------------------------------------------------------------------- 8. an MLflow run as the model
@pytest.mark.slow
def test_register_with_the_model_of_an_mlflow_run_and_of_an_output_folder(tmp_path, monkeypatch, capsys):
    """After `deepsim run --profile quick --losses mse`, the registration run (runs:/<id> or the bare id, with
    --tracking-uri) and the output folder itself all serve as --model; an unknown run id is a one-line error; the
    run's artifacts are stored inside the output folder."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns of the working directory: see below
    uri = f"sqlite:///{tmp_path / 'q' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored afterwards: `deepsim run` sets it for the process
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    out = tmp_path / "q"
    assert main(["run", "--profile", "quick", "--out", str(out), "--losses", "mse", "--no-progress"]) == 0
    capsys.readouterr()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    chosen = runs[(runs["tags.similarity"] == "mse") | runs["tags.mlflow.runName"].str.startswith("registration-")]
    assert len(chosen) == 1
    run_id = chosen["run_id"].iloc[0]
    # the checkpoint artifacts live beside the database, inside --out, not in ./mlruns of the working directory
    assert chosen["artifact_uri"].iloc[0].startswith((out / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()

    datalist = json.loads((out / "data" / "datalist.json").read_text())
    fixed, moving = (out / "data" / item["image"] for item in datalist["test"][:2])
    for name, model in {"runs": f"runs:/{run_id}", "bare": run_id, "folder": str(out)}.items():
        target = tmp_path / f"reg-{name}"
        assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", model,
                     "--tracking-uri", uri, "--out", str(target), "--no-progress"]) == 0, name
        for file in ("warped.nii.gz", "ddf_mm.nii.gz", "jacobian_det.nii.gz", "registration.json"):
            assert (target / file).is_file(), (name, file)
        report = json.loads((target / "registration.json").read_text())
        assert report["similarity"] == "mse" and Path(report["model"]).name == "registration_mse.pt"
    capsys.readouterr()
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", "0" * 32,
                 "--tracking-uri", uri, "--out", str(tmp_path / "reg-unknown"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CheckpointError: MLflow run 00000000000000000000000000000000" in err
    assert not (tmp_path / "reg-unknown").exists()


def test_pairs_csv_registers_every_pair_like_single_calls(tmp_path, models, capsys):
    """--pairs: one folder per pair with the same outputs as a single `register` call, and registrations.csv."""
    fixed, moving, _ = _deformed_pair(tmp_path, FIXED_AFFINES["RAS"], (20, 20, 20))
    flabel = _save(tmp_path / "fl.nii.gz", _labels(_world((20, 20, 20), FIXED_AFFINES["RAS"])), FIXED_AFFINES["RAS"])
    mlabel = _save(tmp_path / "ml.nii.gz", _labels(_world(MOVING_SHAPE, MOVING_AFFINE)), MOVING_AFFINE)
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_label,moving_label,name\n"
                                        f"{fixed.name},{moving.name},{flabel.name},{mlabel.name},with_labels\n"
                                        f"{fixed},{moving},,,\n")
    out = tmp_path / "batch"
    assert main(["register", "--pairs", str(tmp_path / "pairs.csv"), "--model", str(models[3]), "--out", str(out),
                 "--no-progress"]) == 0
    assert "2 pairs registered" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "registrations.csv")))
    assert [r["name"] for r in rows] == ["with_labels", "pair_0002"]
    assert rows[0]["dice_after"] and not rows[1]["dice_after"]
    single = tmp_path / "single"
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--fixed-label", str(flabel),
                 "--moving-label", str(mlabel), "--model", str(models[3]), "--out", str(single), "--no-progress"]) == 0
    for name in ("warped.nii.gz", "ddf_mm.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz"):
        assert np.array_equal(nib.load(str(out / "with_labels" / name)).get_fdata(),
                              nib.load(str(single / name)).get_fdata()), name
    assert not (out / "pair_0002" / "warped_label.nii.gz").exists()


@pytest.mark.parametrize("content, expected", [
    ("fixed,moving\n", "lists no pairs"),
    ("fixed,mov\na.nii.gz,b.nii.gz\n", "missing ['moving'], unknown ['mov']"),
    ("fixed,moving\nfixed.nii.gz,absent.nii.gz\n", "line 2: moving"),
    ("fixed,moving,name\nfixed.nii.gz,fixed.nii.gz,x\nfixed.nii.gz,fixed.nii.gz,x\n", "line 3: name 'x' is repeated"),
])
def test_a_bad_pairs_csv_is_one_line_and_writes_nothing(tmp_path, models, capsys, content, expected):
    _save(tmp_path / "fixed.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    (tmp_path / "pairs.csv").write_text(content)
    out = tmp_path / "batch"
    assert main(["register", "--pairs", str(tmp_path / "pairs.csv"), "--model", str(models[3]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepsim: error: DatasetError: ") and "pairs.csv" in err, err
    assert expected in err, err
    assert not out.exists()


def test_pairs_and_fixed_together_are_refused(tmp_path, models, capsys):
    assert main(["register", "--pairs", "p.csv", "--fixed", "f.nii.gz", "--out", str(tmp_path / "o")]) == 2
    assert "--pairs replaces --fixed" in capsys.readouterr().err
    assert main(["register", "--out", str(tmp_path / "o")]) == 2
    assert "needs --fixed and --moving (or --pairs CSV)" in capsys.readouterr().err
