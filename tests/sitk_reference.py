"""SimpleITK as an independent reference for the tests: geometry conversion and ITK's own affine registration.

deepsim registers and resamples with torch alone (:mod:`deepsim.registration.affine`, :mod:`.geometry`); the
tests compare that with what ITK computes for the same images. ITK works in LPS with (k, j, i) array order; our
arrays are (i, j, k) with a voxel -> RAS affine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(array: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """NumPy (i, j, k) volume + voxel->RAS affine -> SimpleITK image with the same world geometry (LPS)."""
    affine_lps = _RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (NumPy (i, j, k) volume, voxel->RAS affine)."""
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    return array, _RAS_TO_LPS @ affine_lps


def estimate_affine_sitk(fixed: sitk.Image, moving: sitk.Image, iterations: int = 100, seed: int = 0,
                         shrink_factors: Sequence[int] = (8, 4, 2), metric: str = "mattes") -> sitk.Transform:
    """ITK's affine registration (fixed point -> moving point): moments-centred start, Mattes MI on 10 % random
    samples (``metric="mattes"``) or normalised correlation on every voxel (``"correlation"``), regular-step
    gradient descent over the pyramid levels."""
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    if metric == "correlation":
        method.SetMetricAsCorrelation()
    else:
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.1, int(seed) + 1)  # seed 0 would mean "from the wall clock" in ITK
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    smallest = min(fixed.GetSize() + moving.GetSize())
    shrink_factors = [int(f) for f in shrink_factors if smallest // int(f) >= 16] or [1]
    method.SetShrinkFactorsPerLevel(shrink_factors)
    method.SetSmoothingSigmasPerLevel([f / 2.0 for f in shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def matrix_of(transform: sitk.Transform) -> np.ndarray:
    """An ITK transform (LPS points) as a 4x4 RAS world -> world matrix, read off the images of the unit points."""
    lps = np.eye(4)
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    for axis in range(3):
        lps[:3, axis] = np.asarray(transform.TransformPoint(tuple(np.eye(3)[axis]))) - origin
    lps[:3, 3] = origin
    return _RAS_TO_LPS @ lps @ _RAS_TO_LPS


def resample_sitk(array: np.ndarray, affine_ras: np.ndarray, transform: sitk.Transform | None,
                  grid_affine_ras: np.ndarray, grid_shape: Sequence[int], is_label: bool) -> np.ndarray:
    """ITK's Resample of a volume onto a grid through ``transform`` (grid point -> volume point); 0 outside."""
    reference = to_sitk(np.zeros(tuple(int(n) for n in grid_shape), dtype=np.uint8), grid_affine_ras)
    moving = to_sitk(array, affine_ras)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out = sitk.Resample(moving, reference, transform or sitk.Transform(3, sitk.sitkIdentity), interpolator, 0,
                        moving.GetPixelID())
    return from_sitk(out)[0]
