"""The checks of an input file's voxel grid: one place that decides whether a geometry is usable.

:func:`check_affine`: is the header's voxel-to-world affine a grid deepsim (and MONAI, nibabel) can orient? Every
loader of user files calls it with the affine it read: ``io.read_image``, ``io.load_volume`` and
``io.load_displacement`` (``deepsim register`` and ``warp``), the dataset chain's ``ValidateFilesd`` and
``LoadFilesd`` (``prepare_user_dataset``, the embedded brains) and the prepared-data reader ``data.pairs``. A grid
passes when

1. every entry of the 4x4 affine is finite;
2. every voxel axis is between :data:`MIN_VOXEL_MM` and :data:`MAX_VOXEL_MM` long (length 0: a singular affine);
3. the voxel axes point in independent directions: the smallest singular value of the unit axis vectors is at least
   :data:`MIN_AXIS_INDEPENDENCE`, so nibabel's ``io_orientation`` (which MONAI's ``Orientationd`` calls) gives each
   axis a world direction of its own;
4. every voxel centre lies within :data:`WORLD_LIMIT_MM` of the world origin along each axis.

A determinant test alone lets through grids no library can orient: a 1×1×1 label map whose sform had a 1e30
off-diagonal term (``tests/data/orientation_crash.nii``) has determinant 1, yet its unit axes 0 and 1 are parallel
to double precision, ``io_orientation`` returns NaN for axis 1 and ``Orientationd`` raised
``ValueError: Unable to find out axis 1.0 in start_ornt`` (issue 24).

:func:`check_extent`: is the grid a sensible size at the spacing it will be resampled to (``deepsim register``'s
working grid, the dataset chain's ``Spacingd``)? A wrong voxel size or unit in the header gives a handful of voxels
or billions (MONAI's ``Spacingd`` then fails allocating them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepsim.errors import DatasetError

__all__ = ["MIN_VOXEL_MM", "MAX_VOXEL_MM", "MIN_AXIS_INDEPENDENCE", "WORLD_LIMIT_MM", "MIN_WORKING_VOXELS",
           "MAX_WORKING_VOXELS", "check_affine", "check_extent"]

#: shortest voxel axis accepted (mm): a nanometre, below any imaging device's voxel (micron files are scaled to mm
#: before the check, so a 0.1 µm microscope voxel is 1e-4 mm)
MIN_VOXEL_MM = 1e-6
#: longest voxel axis accepted (mm): 10 m
MAX_VOXEL_MM = 1e4
#: smallest singular value of the unit voxel-axis vectors: 1e-3 is two axes 0.08° apart; nibabel's
#: ``io_orientation`` drops directions below about 1e-15, sheared CT grids (gantry tilt ≤ 30°) sit near 0.5
MIN_AXIS_INDEPENDENCE = 1e-3
#: farthest voxel centre from the world origin (mm, per axis): 1 km, where float32 world coordinates (the GPU path)
#: still resolve 0.07 mm; scanners place images within about a metre of it
WORLD_LIMIT_MM = 1e6
#: fewer resampled voxels than this along an axis: the header's voxel size or unit is wrong (or the image is no scan)
MIN_WORKING_VOXELS = 4
#: more resampled voxels than this (2**28: 645^3, 23 GB for one float32 field of 3 components at 1 mm) is refused
MAX_WORKING_VOXELS = 2**28


def _nearest_pair(unit: np.ndarray) -> tuple[int, int, float]:
    """(i, j, angle in degrees) of the two voxel axes (columns of ``unit``) closest to parallel or antiparallel."""
    ndim = unit.shape[1]
    best = (0, 1, 90.0)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            cosine = min(abs(float(unit[:, i] @ unit[:, j])), 1.0)
            angle = float(np.degrees(np.arccos(cosine)))
            if angle < best[2]:
                best = (i, j, angle)
    return best


def check_affine(path: str | Path, affine: np.ndarray, shape: Sequence[int]) -> None:
    """DatasetError (one line naming ``path``) unless ``affine`` is a usable voxel grid for an image of ``shape``.

    ``affine``: (4, 4) voxel -> world (mm; scale metre or micron files first, :func:`deepsim.io.affine_in_mm`).
    ``shape``: the spatial shape (1 to 3 axes); only the affine's first ``len(shape)`` voxel axes are checked, so
    a 2D slice stored with a zero slice thickness passes. See the module docstring for the four conditions.
    """
    prefix = f"{path}: the header's voxel-to-world affine"
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise DatasetError(f"{prefix} holds NaN or infinite values")
    ndim = min(len(shape), 3)
    axes = matrix[:3, :ndim]
    lengths = np.linalg.norm(axes, axis=0)
    for i, length in enumerate(lengths):
        if length == 0.0:
            raise DatasetError(f"{prefix} is singular (voxel axis {i} has length 0)")
        if not MIN_VOXEL_MM <= length <= MAX_VOXEL_MM:
            raise DatasetError(f"{path}: voxel axis {i} is {length:.3g} mm long, outside the {MIN_VOXEL_MM:g} to "
                               f"{MAX_VOXEL_MM:g} mm of any imaging device; check the header's voxel size and units")
    unit = axes / lengths
    independence = float(np.linalg.svd(unit, compute_uv=False).min())
    if independence < MIN_AXIS_INDEPENDENCE:
        i, j, angle = _nearest_pair(unit)
        where = (f"voxel axes {i} and {j} are {angle:.2g} degrees from parallel" if ndim == 2 or angle < 1.0
                 else "its voxel axes lie in one plane")
        raise DatasetError(f"{prefix} is singular or nearly so ({where}); no orientation can be read from it")
    corners = np.array(np.meshgrid(*[[0, max(int(n) - 1, 0)] for n in shape[:ndim]], indexing="ij")).reshape(ndim, -1)
    reach = float(np.abs(axes @ corners + matrix[:3, 3:]).max())
    if reach > WORLD_LIMIT_MM:
        raise DatasetError(f"{path}: the image reaches {reach:.3g} mm from the world origin (at most "
                           f"{WORLD_LIMIT_MM:g} mm); check the header's origin and units")


def _extent_mm(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Side lengths (mm) of the world bounding box of the grid's voxel centres (the in-plane box for 2D)."""
    ndim = len(shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(ndim, -1)
    world = np.asarray(affine, dtype=np.float64)[:ndim, :ndim] @ corners
    return world.max(axis=1) - world.min(axis=1)


def check_extent(path: str | Path, affine: np.ndarray, shape: Sequence[int], spacing_mm: float,
                 whose: str = "the model's") -> None:
    """DatasetError when a grid (``affine`` 4x4 in mm, spatial ``shape``) is absurdly small or large at
    ``spacing_mm`` (``whose`` spacing, for the message): a wrong voxel size or unit in the header (a brain in metres
    read as millimetres spans 0.2 mm; one in microns 180 m)."""
    extent = _extent_mm(affine, shape)
    voxels = np.floor(extent / spacing_mm + 1e-6) + 1
    size = " x ".join(f"{e:.3g}" for e in extent)
    if voxels.min() < MIN_WORKING_VOXELS:
        raise DatasetError(f"{path}: the image spans {size} mm, less than {MIN_WORKING_VOXELS} voxels of {whose} "
                           f"{spacing_mm:g} mm spacing along an axis; check the header's voxel size and units "
                           "(NIfTI xyzt_units: meter, mm or micron)")
    if float(np.prod(voxels)) > MAX_WORKING_VOXELS:
        raise DatasetError(f"{path}: the image spans {size} mm, which needs {int(np.prod(voxels)):,} voxels at "
                           f"{whose} {spacing_mm:g} mm spacing (at most {MAX_WORKING_VOXELS:,}); check the header's "
                           "voxel size and units (NIfTI xyzt_units: meter, mm or micron)")
