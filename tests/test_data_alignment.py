"""Affine pre-alignment: RAS <-> SimpleITK geometry round trips, resampling onto grids, a known shift recovered."""

import numpy as np
import pytest
import SimpleITK as sitk

from deepsim.data.alignment import estimate_affine, from_sitk, reference_grid, resample_to_grid, to_sitk


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.5, -2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    return affine


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-1.0, -1.0, 1.0, 1.0]), _oblique_affine()],
                         ids=["RAS", "LPS", "oblique"])
def test_sitk_round_trip_keeps_array_and_affine(affine):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    image = to_sitk(array, affine)
    back, back_affine = from_sitk(image)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    # the voxel (i, j, k) = (1, 2, 3) sits at the same world point in both conventions (ITK works in LPS)
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


def test_estimate_affine_recovers_a_known_translation():
    x, y, z = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    blob = lambda cx, cy, cz: (np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 40.0)  # noqa: E731
                               + 0.6 * np.exp(-((x - cx - 8) ** 2 + (y - cy) ** 2 + (z - cz + 5) ** 2) / 15.0))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fixed = to_sitk(blob(20, 20, 20).astype(np.float32), affine)
    moving = to_sitk(blob(23, 18, 20).astype(np.float32), affine)  # content moved +3 mm R, -2 mm A
    transform = estimate_affine(fixed, moving, iterations=200, shrink_factors=(2, 1))
    # ITK transforms map fixed points to moving points: in LPS, +3 mm R is -3 along x, -2 mm A is +2 along y
    mapped = np.asarray(transform.TransformPoint((-20.0, -20.0, 20.0)))
    np.testing.assert_allclose(mapped - [-20.0, -20.0, 20.0], [-3.0, 2.0, 0.0], atol=0.3)
    assert isinstance(transform, sitk.Transform)
