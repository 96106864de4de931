"""Affine pre-alignment of the embedded donors (torch): resampling onto grids and a known shift, against SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk

from deepsim.data.alignment import reference_grid, resample_to_grid
from deepsim.registration.affine import estimate_affine
from sitk_reference import estimate_affine_sitk, from_sitk, matrix_of, resample_sitk, to_sitk


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.5, -2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    return affine


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-1.0, -1.0, 1.0, 1.0]), _oblique_affine()],
                         ids=["RAS", "LPS", "oblique"])
def test_sitk_reference_round_trip_keeps_array_and_affine(affine):
    """The test helper that hands our volumes to SimpleITK keeps their world geometry (ITK works in LPS)."""
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    image = to_sitk(array, affine)
    back, back_affine = from_sitk(image)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    ras = affine @ np.array([1, 2, 3, 1.0])
    lps = image.TransformIndexToPhysicalPoint((1, 2, 3))
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)


def test_resampling_onto_a_grid_shifted_by_whole_voxels_shifts_the_labels_exactly():
    labels = np.zeros((10, 10, 10), dtype=np.int32)
    labels[3:6, 4:7, 2:5] = 1002
    affine = reference_grid((0.0, 0.0, 0.0), 2.0, labels.shape)
    shifted = affine.copy()
    shifted[:3, 3] += [2.0, 4.0, 0.0]  # grid origin one voxel further along x, two along y
    out = resample_to_grid(labels, affine, None, shifted, labels.shape, is_label=True)
    assert out.dtype == labels.dtype and set(np.unique(out)) == {0, 1002}
    np.testing.assert_array_equal(out[2:5, 2:5, 2:5], labels[3:6, 4:7, 2:5])
    np.testing.assert_array_equal(resample_to_grid(labels, affine, None, affine, labels.shape, True), labels)


def test_resampling_through_a_transform_equals_simpleitk_resample():
    """Linear images and nearest-neighbour labels through a rotation onto an oblique grid: ITK's Resample agrees."""
    rng = np.random.default_rng(1)
    image = rng.random((12, 14, 10)).astype(np.float32)
    labels = rng.integers(0, 4, (12, 14, 10)).astype(np.int16) * 1000
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    transform = np.eye(4)
    c, s = np.cos(0.1), np.sin(0.1)
    transform[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    transform[:3, 3] = [1.3, -0.7, 0.4]
    grid_affine, grid_shape = _oblique_affine(), (9, 8, 11)
    grid_affine[:3, 3] = [4.0, 20.0, 3.0]  # inside the image's field of view (0-22, 0-26, 0-18 mm)
    itk = sitk.AffineTransform(3)
    flip = np.diag([-1.0, -1.0, 1.0])
    itk.SetMatrix((flip @ transform[:3, :3] @ flip).ravel().tolist())
    itk.SetTranslation((flip @ transform[:3, 3]).tolist())
    ours = resample_to_grid(image, affine, transform, grid_affine, grid_shape, is_label=False)
    theirs = resample_sitk(image, affine, itk, grid_affine, grid_shape, is_label=False)
    inside = theirs != 0
    assert inside.sum() > 100
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-4)
    ours_l = resample_to_grid(labels, affine, transform, grid_affine, grid_shape, is_label=True)
    theirs_l = resample_sitk(labels, affine, itk, grid_affine, grid_shape, is_label=True)
    assert ours_l.dtype == labels.dtype
    assert (ours_l == theirs_l).mean() > 0.99  # rounding ties at exact half-voxel positions may go either way


def _blobs(shift):
    x, y, z = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    cx, cy, cz = 20 + shift[0], 20 + shift[1], 20 + shift[2]
    return (np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 40.0)
            + 0.6 * np.exp(-((x - cx - 8) ** 2 + (y - cy) ** 2 + (z - cz + 5) ** 2) / 15.0)).astype(np.float32)


def test_estimate_affine_recovers_a_known_translation_as_simpleitk_does():
    affine = np.eye(4)
    fixed, moving = _blobs((0, 0, 0)), _blobs((3, -2, 0))  # content moved +3 mm R, -2 mm A
    ours = estimate_affine(fixed, affine, moving, affine, levels=(2, 1))
    centre = np.array([20.0, 20.0, 20.0, 1.0])
    np.testing.assert_allclose((ours @ centre - centre)[:3], [3.0, -2.0, 0.0], atol=0.2)
    theirs = matrix_of(estimate_affine_sitk(to_sitk(fixed, affine), to_sitk(moving, affine), iterations=200,
                                            shrink_factors=(2, 1)))
    np.testing.assert_allclose(ours @ centre, theirs @ centre, atol=0.3)
