"""NIfTI reading and writing that keeps geometry: every array comes with its affine, every file gets one.

Geometry rules (docs/reliability.md): affines are returned in millimetres whatever spatial unit the header declares
(metre and micron files are scaled, as ITK does); a file written on an input's grid keeps that input's qform and
sform as given (:func:`save_like`, :func:`save_volume` with ``like``); every file and folder written honours the
process umask (:func:`atomic_write`, :func:`make_staging_dir`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip

from deepsim.errors import DatasetError
from deepsim.grid_check import check_affine

__all__ = ["atomic_write", "load_displacement", "load_volume", "make_staging_dir", "read_image", "save_displacement",
           "save_itk_affine", "save_like", "save_volume", "file_mode", "has_shear", "affine_in_mm",
           "smallest_label_dtype"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux), else set and restored
    under a lock (``os.umask`` is the only portable reader, and it writes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file (0666) or folder (0777) under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def make_staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden temporary folder in ``parent`` (created if needed) with the mode a plain ``mkdir`` gives.

    ``tempfile.mkdtemp`` makes folders 0700 whatever the umask; a staging folder that is renamed into place
    (a prepared dataset, a registration's outputs) must end up readable as the user's umask says."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, file_mode(directory=True))
    return path


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a killed process never leaves a truncated file.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask): ``mkstemp`` creates its
    temporary file 0600, which would make every result unreadable by colleagues whatever their umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def smallest_label_dtype(labels: np.ndarray) -> type:
    """int16, int32 or int64: the first that holds every value of ``labels`` (integers, or integral floats)."""
    if labels.size == 0:
        return np.int16
    lo, hi = labels.min(), labels.max()
    for kind in (np.int16, np.int32):
        if lo >= np.iinfo(kind).min and hi <= np.iinfo(kind).max:
            return kind
    return np.int64


#: gzip level of written .nii.gz files. Compression runs through ISA-L (``isal``), which at level 1 wrote a 1 mm
#: displacement field (87 MB) in 0.29 s where zlib level 1 (nibabel's default path) took 4.0 s, for the same size.
GZIP_LEVEL = 1


def _load_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    """``nib.load``, except that a ``.nii.gz`` is decompressed with ISA-L (several times faster than zlib)."""
    if not path.name.endswith(".nii.gz"):
        return nib.load(str(path))
    raw = igzip.decompress(path.read_bytes())
    klass = nib.Nifti2Image if len(raw) >= 4 and int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Image
    return klass.from_bytes(raw)


def _read_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """(image, voxel array) of a NIfTI file; DatasetError names the file when it is missing or unreadable."""
    if path.is_dir():
        raise DatasetError(f"{path}: a folder, not a NIfTI image file")
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        img = _load_nifti(path)
        return img, np.asarray(img.dataobj)
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable NIfTI image ({type(exc).__name__})") from exc


#: world-unit scale to millimetres of the NIfTI spatial units (what ITK's NIfTI reader applies too)
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _spatial_unit(header) -> str:
    try:
        return header.get_xyzt_units()[0]
    except (AttributeError, KeyError, ValueError):  # Analyze/MGH headers have none; an invalid code is "unknown"
        return "unknown"


def affine_in_mm(affine: np.ndarray, header) -> np.ndarray:
    """``affine`` (voxel -> world in the header's spatial unit) with its world side in millimetres.

    NIfTI files may declare metres or microns (``xyzt_units``); nibabel returns their affine unscaled, so a
    1 mm brain stored in metres would look 1000 times too small (and a 0.1 mm micron image 1000 times too large).
    ITK scales the same way, so SimpleITK and deepsim place such files at the same world points."""
    scale = _UNIT_TO_MM.get(_spatial_unit(header), 1.0)
    affine = np.array(affine, dtype=np.float64)
    if scale != 1.0:
        affine[:3, :] *= scale
    return affine


def has_shear(affine: np.ndarray, ndim: int = 3, tol: float = 1e-4) -> bool:
    """True when the voxel axes of ``affine`` are not orthogonal: a grid ITK's image model (direction cosines
    times spacing) cannot represent."""
    linear = np.asarray(affine, dtype=np.float64)[:ndim, :ndim]
    unit = linear / np.linalg.norm(linear, axis=0, keepdims=True)
    return bool(np.abs(unit.T @ unit - np.eye(ndim)).max() > tol)


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read any NIfTI image -> (array, 4x4 voxel->RAS affine, header); trailing length-1 axes are dropped.

    Only trailing axes are squeezed (a 2D slice stored as (X, Y, 1) becomes (X, Y)), so the affine's columns
    still match the array's axes. DatasetError names the file when it is missing, unreadable, empty, has
    NaN/infinite voxels or a grid :func:`deepsim.grid_check.check_affine` refuses.
    """
    path = Path(path)
    img, data = _read_nifti(path)
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.size == 0:
        raise DatasetError(f"{path}: the image has no voxels (shape {data.shape})")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DatasetError(f"{path}: contains NaN or infinite voxels")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool) or np.iscomplexobj(data):
        raise DatasetError(f"{path}: voxel type {data.dtype} is not real-valued")
    affine = affine_in_mm(img.affine, img.header)
    check_affine(path, affine, data.shape[:3])
    header = img.header if isinstance(img.header, nib.Nifti1Header) else nib.Nifti1Header()
    return data, affine, header


def load_volume(path: str | Path, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume -> (array (*S), 4x4 voxel->RAS affine). DatasetError names the file and the problem."""
    path = Path(path)
    img, data = _read_nifti(path)
    data = np.squeeze(data) if data.ndim > ndim else data
    if data.ndim != ndim:
        raise DatasetError(f"{path} has {data.ndim} dimensions; expected a {ndim}D volume")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DatasetError(f"{path}: contains NaN or infinite voxels")
    if np.iscomplexobj(data):
        raise DatasetError(f"{path}: voxel type {data.dtype} is not real-valued")
    affine = affine_in_mm(img.affine, img.header)
    check_affine(path, affine, data.shape)
    return data, affine


def _save_nifti(path: str | Path, img: nib.Nifti1Image) -> Path:
    if str(path).endswith(".nii.gz"):
        data = igzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    # nibabel picks the format from the file name, so write "<tmp><suffix>" and move it onto the temp path.
    suffix = Path(path).suffix
    return atomic_write(path, lambda tmp: nib.save(img, tmp + suffix) or Path(tmp + suffix).replace(tmp))


_GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                    "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def _nifti(array: np.ndarray, affine: np.ndarray, like: nib.Nifti1Header | None,
           header: nib.Nifti1Header | None = None, qform: bool = True) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` on the grid ``affine`` (mm), stored in the array's own dtype (int64 and uint32 label
    maps included), with ``header``'s other fields.

    When ``like`` (an input's header) describes that same grid, its qform and sform (codes, matrices, spacings,
    spatial unit) are copied as given: an output on an input's grid has the input's geometry fields byte for byte,
    whatever tool reads it and whichever of the two it prefers. Otherwise qform and sform are both set to
    ``affine`` (code 1, or ``like``'s codes), in mm. ``qform=False`` leaves the qform unset (code 0).
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    same_grid = like is not None and np.allclose(affine_in_mm(like.get_best_affine(), like), affine, atol=1e-5)
    # the image's own affine must be the header's (in the header's unit), or nibabel rewrites the sform on saving
    img = nib.Nifti1Image(array, like.get_best_affine() if same_grid else affine, header=header, dtype=array.dtype)
    if same_grid:
        for key in _GEOMETRY_FIELDS:
            img.header[key] = like[key]
        img.header["pixdim"][:4] = like["pixdim"][:4]
        if not qform:
            img.header["qform_code"] = 0
        return img
    codes = (int(like["qform_code"]) or 1, int(like["sform_code"]) or 1) if like is not None else (1, 1)
    img.set_qform(affine if qform else None, code=codes[0] if qform else 0)
    img.set_sform(affine, code=codes[1])
    img.header["xyzt_units"] = (int(img.header["xyzt_units"]) & 0o70) | 2  # space: mm (NIfTI code 2); time kept
    return img


def save_volume(path: str | Path, array: np.ndarray, affine: np.ndarray,
                like: nib.Nifti1Header | None = None) -> Path:
    """Write ``array`` with ``affine`` atomically (ITK-SNAP / 3D Slicer open it on the right grid).

    ``like``: the header of the input whose grid ``affine`` is; its qform and sform are kept as given."""
    return _save_nifti(path, _nifti(array, affine, like))


def save_like(path: str | Path, array: np.ndarray, header: nib.Nifti1Header | None, affine: np.ndarray) -> Path:
    """Write ``array`` on a grid with ``affine`` keeping ``header``'s fields (units, descriptions, codes).

    The data type and scaling follow ``array`` (the reference's ``scl_slope`` would rescale our values). When
    ``affine`` is ``header``'s own grid, its qform and sform are kept as given (not replaced by one another).
    """
    img = _nifti(array, affine, header, header=header.copy() if header is not None else None)
    img.header.set_slope_inter(None, None)
    return _save_nifti(path, img)


def save_displacement(path: str | Path, ddf_mm: np.ndarray, affine: np.ndarray,
                      like: nib.Nifti1Header | None = None) -> Path:
    """Write a displacement field as ITK and ANTs read it: a NIfTI vector image (intent VECTOR) on the fixed grid.

    ``ddf_mm``: (ndim, *S) world displacement in mm with RAS components (what ``ddf_voxel_to_world`` gives for a
    NIfTI affine). ITK works in LPS and its NIfTI reader does not convert vector components, so the file stores
    LPS components (x and y negated), the convention of ANTs' warp fields: SimpleITK's
    ``DisplacementFieldTransform`` + ``Resample`` then reproduce our warp (tests/test_io_itk_field.py). Shape on
    disk: (*S, 1, ndim) in 3D, (*S, 1, 1, ndim) in 2D — the components always on NIfTI's 5th axis.

    ``like``: the header of the image whose grid this is (its qform and sform are kept as given). A grid with
    sheared voxel axes (:func:`has_shear`) is written with the sform alone: ITK cannot represent shear, and with a
    (shear-stripped) qform present it would silently read the field on another grid; without one SimpleITK
    refuses the file ("orthonormal direction cosines") instead. nibabel and ``deepsim warp`` read it exactly.
    """
    ddf_lps = np.asarray(ddf_mm, dtype=np.float32).copy()
    ddf_lps[:2] *= -1.0
    data = np.moveaxis(ddf_lps, 0, -1).reshape(*ddf_lps.shape[1:], *[1] * (5 - ddf_lps.ndim), ddf_lps.shape[0])
    img = _nifti(data, affine, like, qform=not has_shear(affine, ddf_lps.shape[0]))
    img.header.set_intent("vector", (), "disp mm ITK LPS")
    return _save_nifti(path, img)


def load_displacement(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a field written by :func:`save_displacement` (or by ITK/ANTs: LPS components, mm).

    Returns ``(ddf_mm, affine)``: (ndim, *S) displacement in mm with RAS components, and the grid's voxel->RAS
    affine. DatasetError names the file and the problem.
    """
    path = Path(path)
    img, data = _read_nifti(path)
    data = data.astype(np.float32, copy=False)
    if data.ndim != 5 or data.shape[-1] not in (2, 3):
        raise DatasetError(f"{path} has shape {data.shape}; expected a displacement field (*S, 1, ndim) on NIfTI's "
                           "5th axis")
    ndim = data.shape[-1]
    spatial = data.shape[:ndim]
    if any(n != 1 for n in data.shape[ndim:-1]):
        raise DatasetError(f"{path} has shape {data.shape}; expected {ndim} spatial axes for {ndim} components")
    ddf = np.moveaxis(data.reshape(*spatial, ndim), -1, 0).copy()
    if not np.isfinite(ddf).all():
        raise DatasetError(f"{path}: contains NaN or infinite displacements")
    affine = affine_in_mm(img.affine, img.header)
    check_affine(path, affine, spatial)
    ddf[:2] *= -1.0  # LPS -> RAS components
    return ddf, affine


def save_itk_affine(path: str | Path, matrix: np.ndarray, ndim: int = 3) -> Path:
    """Write a world -> world affine (4x4, RAS, mm; 2D: top-left 2x2 and translation) as an ITK transform file.

    ITK's text format (``.tfm``/``.txt``), read by SimpleITK's ``ReadTransform``, ANTs and 3D Slicer: an
    ``AffineTransform_double_<n>_<n>`` in LPS (x and y negated on both sides), centre 0. Written without
    SimpleITK (the GPU path has none); tests/test_register.py reads it back with SimpleITK.
    """
    m = np.asarray(matrix, dtype=np.float64)
    flip = np.diag([-1.0, -1.0, 1.0][:ndim])
    linear = flip @ m[:ndim, :ndim] @ flip
    shift = flip @ m[:ndim, 3]
    numbers = " ".join(repr(float(v)) for v in [*linear.ravel(), *shift])
    text = (f"#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_{ndim}_{ndim}\n"
            f"Parameters: {numbers}\nFixedParameters: {' '.join(['0'] * ndim)}\n")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
