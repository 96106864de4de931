"""The written displacement field is ITK-readable: SimpleITK resampling through it reproduces our warp."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepsim.io import load_displacement, save_displacement, save_volume
from deepsim.spatial import ddf_voxel_to_world, warp_image


def _oblique_affine(theta: float) -> np.ndarray:
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.5, 1.0, 2.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    return affine


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-1.0, -1.0, 1.5, 1.0]),
                                    _oblique_affine(0.3)], ids=["RAS", "LPS", "oblique"])
def test_simpleitk_resampling_through_the_written_field_reproduces_our_warp(tmp_path, affine):
    shape = (24, 28, 20)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    image = (np.sin(6 * grid[0]) * np.cos(5 * grid[1]) + grid[2]).astype(np.float32)
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 0] = 1.3 * torch.sin(torch.tensor(3 * grid[1]))
    ddf[0, 1] = -0.8
    ddf[0, 2] = 0.5 * torch.cos(torch.tensor(4 * grid[0]))
    ours = warp_image(torch.tensor(image)[None, None], ddf)[0, 0].numpy()
    ddf_mm = ddf_voxel_to_world(ddf, torch.tensor(affine, dtype=torch.float32))[0].numpy()
    save_displacement(tmp_path / "field.nii.gz", ddf_mm, affine)
    save_volume(tmp_path / "moving.nii.gz", image, affine)
    assert nib.load(tmp_path / "field.nii.gz").shape == (*shape, 1, 3)

    field = sitk.Cast(sitk.ReadImage(str(tmp_path / "field.nii.gz")), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    itk = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    itk = np.transpose(sitk.GetArrayFromImage(itk), (2, 1, 0))
    inner = (slice(3, -3),) * 3  # border voxels: ITK and MONAI pad outside the image differently
    # measured: 3.6e-7 of an intensity range of 3 (float32 rounding); RAS components instead of LPS gave 0.63
    assert np.abs(itk[inner] - ours[inner]).max() < 1e-4


def _field_and_image(tmp_path, affine):
    shape = (16, 18, 14)
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    labels = rng.choice([0, 7, 1002, 2035], size=shape).astype(np.int16)
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 0], ddf[0, 2] = 1.7, -0.6
    ddf_mm = ddf_voxel_to_world(ddf, torch.tensor(affine, dtype=torch.float32))[0].numpy()
    save_displacement(tmp_path / "field.nii.gz", ddf_mm, affine)
    save_volume(tmp_path / "image.nii.gz", image, affine)
    save_volume(tmp_path / "labels.nii.gz", labels, affine)
    return image, labels, ddf


def test_warp_command_applies_a_saved_field_like_the_registration_did(tmp_path):
    from deepsim.cli import main

    affine = _oblique_affine(-0.4)
    image, labels, ddf = _field_and_image(tmp_path, affine)
    assert main(["warp", "--field", str(tmp_path / "field.nii.gz"), "--image", str(tmp_path / "image.nii.gz"),
                 "--out", str(tmp_path / "w.nii.gz")]) == 0
    out = nib.load(tmp_path / "w.nii.gz")
    expected = warp_image(torch.tensor(image)[None, None], ddf)[0, 0].numpy()
    assert np.allclose(out.affine, affine, atol=1e-6)
    inside = (slice(0, -2), slice(None), slice(1, None))  # x + (1.7, 0, -0.6) stays in the image: no padding rule
    assert np.abs(out.get_fdata()[inside] - expected[inside]).max() < 1e-5
    assert main(["warp", "--field", str(tmp_path / "field.nii.gz"), "--image", str(tmp_path / "labels.nii.gz"),
                 "--out", str(tmp_path / "wl.nii.gz"), "--label"]) == 0
    warped_labels = np.asarray(nib.load(tmp_path / "wl.nii.gz").dataobj)
    assert set(np.unique(warped_labels)) <= {0, 7, 1002, 2035}
    # nearest neighbour of x + (1.7, 0, -0.6) voxels is x + (2, 0, -1)
    assert np.array_equal(warped_labels[:-3, :, 1:], labels[2:-1, :, :-1])


def test_warp_command_reads_an_image_on_another_grid_at_world_points_like_simpleitk(tmp_path):
    """The moving image keeps its own grid: warp samples it at x + d(x) in world space, as ITK's Resample does."""
    from deepsim.cli import main

    _field_and_image(tmp_path, _oblique_affine(0.2))
    rng = np.random.default_rng(1)
    other_affine = np.diag([-1.2, 0.9, 1.1, 1.0])
    other_affine[:3, 3] = [10.0, -2.0, 0.0]
    save_volume(tmp_path / "other.nii.gz", rng.random((36, 34, 30)).astype(np.float32), other_affine)
    assert main(["warp", "--field", str(tmp_path / "field.nii.gz"), "--image", str(tmp_path / "other.nii.gz"),
                 "--out", str(tmp_path / "w.nii.gz")]) == 0
    ours = np.asarray(nib.load(tmp_path / "w.nii.gz").dataobj)

    field = sitk.Cast(sitk.ReadImage(str(tmp_path / "field.nii.gz")), sitk.sitkVectorFloat64)
    reference = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    itk = sitk.Resample(sitk.ReadImage(str(tmp_path / "other.nii.gz")), reference,
                        sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    itk = np.transpose(sitk.GetArrayFromImage(itk), (2, 1, 0))
    # where x + d(x) falls strictly inside the other image's voxel-centre box, both interpolate the same 8 voxels
    # (ITK also reads up to half a voxel beyond it, where torch blends with the zero outside)
    affine = _oblique_affine(0.2)
    ddf_mm, _ = load_displacement(tmp_path / "field.nii.gz")
    index = np.stack(np.meshgrid(*[np.arange(n) for n in ddf_mm.shape[1:]], indexing="ij")).reshape(3, -1)
    target = affine[:3, :3] @ index + affine[:3, 3:] + ddf_mm.reshape(3, -1)
    voxel = np.linalg.inv(other_affine[:3, :3]) @ (target - other_affine[:3, 3:])
    inside = np.all((voxel >= 0) & (voxel <= np.array([[35], [33], [29]])), axis=0).reshape(ddf_mm.shape[1:])
    assert inside.mean() > 0.3  # the grids overlap: the comparison is not 0 == 0
    assert np.abs(itk[inside] - ours[inside]).max() < 1e-5  # measured 4e-7 (float32)


def test_warp_command_line_prints_exactly_one_line_for_a_bad_field(tmp_path):
    import subprocess
    import sys

    save_volume(tmp_path / "plain.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    proc = subprocess.run([sys.executable, "-m", "deepsim.cli", "warp", "--field", str(tmp_path / "plain.nii.gz"),
                           "--image", str(tmp_path / "plain.nii.gz"), "--out", str(tmp_path / "o.nii.gz")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "plain.nii.gz" in proc.stderr and "displacement field" in proc.stderr
    assert not (tmp_path / "o.nii.gz").exists()
