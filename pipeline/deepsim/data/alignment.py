"""Affine pre-alignment of whole subjects into one reference space (SimpleITK), before deformable registration.

The six embedded donors live in their own native scanner spaces: brain centres differ by up to ~20 mm and mean DK
Dice between donors in world space is 0.11 (1 mm, measured with ``nibabel.processing.resample_from_to``). Learned
deformable registration is normally trained on affinely pre-aligned data (OASIS, Learn2Reg), so the embedded
dataset aligns every donor to a reference donor by a 12-parameter affine transform estimated on synthesized
T1-like images (Mattes mutual information, multi-resolution), and resamples image and labels onto one common grid.

Arrays here are NumPy ``(i, j, k)`` volumes with a 4x4 voxel -> RAS affine (NIfTI convention); SimpleITK works in
LPS with ``(k, j, i)`` array order. All conversions between the two live in this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: SimpleITK is only needed for affine alignment (and is a 50 MB wheel)
    import SimpleITK as sitk

__all__ = ["to_sitk", "from_sitk", "reference_grid", "estimate_affine", "resample_to_grid"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(array: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """NumPy (i, j, k) volume + voxel->RAS affine -> SimpleITK image with the same world geometry (LPS)."""
    import SimpleITK as sitk

    affine_lps = _RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (NumPy (i, j, k) volume, voxel->RAS affine)."""
    import SimpleITK as sitk

    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    return array, _RAS_TO_LPS @ affine_lps


def reference_grid(center_ras: Sequence[float], spacing_mm: float, shape: Sequence[int]) -> np.ndarray:
    """Voxel->RAS affine of an axis-aligned RAS grid of ``shape`` voxels of ``spacing_mm`` centred on ``center_ras``."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = np.asarray(center_ras, dtype=np.float64) - spacing_mm * (np.asarray(shape) - 1) / 2.0
    return affine


def estimate_affine(fixed: sitk.Image, moving: sitk.Image, iterations: int = 100, seed: int = 0,
                    shrink_factors: Sequence[int] = (8, 4, 2)) -> sitk.Transform:
    """Affine transform mapping fixed-space points into the moving image (ITK convention), intensity-based.

    Moments-based centring, then a 12-parameter affine fitted with Mattes mutual information (10 % random
    samples) on three resolution levels, regular-step gradient descent. The default levels stop at half the
    input resolution: on 1 mm brains this took 2-4 s per donor instead of 23-67 s at full resolution (2 CPU
    cores), for an affine that is then applied at 2 mm anyway.
    """
    import SimpleITK as sitk

    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): offset by one, so every seed repeats
    method.SetMetricSamplingPercentage(0.1, int(seed) + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    # a level must keep enough voxels to sample: drop shrink factors that leave fewer than 16 along an axis
    smallest = min(fixed.GetSize() + moving.GetSize())
    shrink_factors = [int(f) for f in shrink_factors if smallest // int(f) >= 16] or [1]
    method.SetShrinkFactorsPerLevel(shrink_factors)
    method.SetSmoothingSigmasPerLevel([f / 2.0 for f in shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def resample_to_grid(array: np.ndarray, affine_ras: np.ndarray, transform: sitk.Transform | None,
                     grid_affine_ras: np.ndarray, grid_shape: Sequence[int], is_label: bool) -> np.ndarray:
    """Resample a volume onto a reference grid through ``transform`` (reference point -> volume point).

    Linear interpolation for images, nearest neighbour for label maps (values preserved); zero outside.
    """
    import SimpleITK as sitk

    reference = to_sitk(np.zeros(tuple(int(n) for n in grid_shape), dtype=np.uint8), grid_affine_ras)
    moving = to_sitk(array, affine_ras)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out = sitk.Resample(moving, reference, transform or sitk.Transform(3, sitk.sitkIdentity), interpolator, 0,
                        moving.GetPixelID())
    return from_sitk(out)[0]
