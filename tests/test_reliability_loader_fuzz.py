"""Reliability: random NIfTI files (shapes, dtypes, headers, affines, damaged bytes) into every image loader.

The property: each loader returns a valid result (finite voxels of the requested dimensionality, a finite
invertible affine) or raises our DatasetError naming the file; never another exception, never a hang.
"""

import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsim.data.transforms import Chain, loading_transforms
from deepsim.errors import DatasetError
from deepsim.io import load_volume, read_image
from deepsim.registration.inference import load_native

pytestmark = pytest.mark.reliability

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64,
          np.complex64]
SPECIAL = [0.0, -1.0, 2.5, 1e30, float("nan"), float("inf")]


@contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging when a loader takes longer than ``seconds``."""
    def alarm(signum, frame):
        raise TimeoutError(f"loader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def nifti_files(draw):
    """(bytes of a NIfTI file, suffix): random shape/dtype/values/affine/header, sometimes damaged."""
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "constant", "labels", "special"]))
    if kind == "labels":
        data = rng.integers(0, 4, shape)
    elif kind == "constant":
        data = np.full(shape, 3)
    else:
        data = rng.normal(0, 100, shape)
        if kind == "special" and data.size:
            data.flat[rng.integers(data.size)] = draw(st.sampled_from(SPECIAL))
    with np.errstate(all="ignore"):
        data = data.astype(dtype)
    affine = np.diag([*draw(st.lists(st.sampled_from([1.0, 2.0, -1.5, 0.0, 1e-12]), min_size=3, max_size=3)), 1.0])
    if draw(st.booleans()):
        affine[:3, :3] += rng.normal(0, 0.3, (3, 3))
    if draw(st.booleans()):
        affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = draw(st.sampled_from(SPECIAL))
    # the header is filled field by field: nibabel's own setters refuse singular or non-finite affines
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_sform(affine, code=draw(st.integers(0, 4)))
    header["qform_code"] = draw(st.integers(0, 4))
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x"):
        header[field] = draw(st.sampled_from([0.0, 0.5, 1.0, *SPECIAL]))
    if draw(st.booleans()):
        header["scl_slope"] = draw(st.sampled_from(SPECIAL))
        header["scl_inter"] = draw(st.sampled_from(SPECIAL))
    if draw(st.booleans()):
        header["pixdim"][1:4] = draw(st.lists(st.sampled_from(SPECIAL), min_size=3, max_size=3))
    img = nib.Nifti1Image(data, None, header=header)
    suffix = draw(st.sampled_from([".nii", ".nii.gz"]))
    raw = img.to_bytes()
    if suffix == ".nii.gz":
        import gzip

        raw = gzip.compress(raw, compresslevel=1)
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif damage == "flip" and raw:
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
        raw = bytes(raw)
    return raw, suffix


def _valid_array(array: np.ndarray, ndims: tuple[int, ...]) -> None:
    assert array.ndim in ndims and array.size > 0
    if np.issubdtype(array.dtype, np.inexact):
        assert np.isfinite(array).all()


def _valid_affine(affine: np.ndarray, ndim: int) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    assert affine.shape == (4, 4) and np.isfinite(affine).all()
    assert abs(np.linalg.det(affine[:ndim, :ndim])) > 0


def _loaders(path: Path):
    """(name, call, check of its result) of every loader a user file reaches."""
    def chain(image_key):
        keys = {"label": str(path)} if image_key is None else {"image": str(path), "label": str(path)}
        return Chain(loading_transforms(image_key, "label"))(keys)

    def check_chain(out):
        for key in ("image", "label"):
            if key in out:
                _valid_array(np.asarray(out[key]), (4,))
                _valid_affine(out[key].affine.numpy(), 3)

    return [
        ("read_image", lambda: read_image(path), lambda out: (_valid_array(out[0], (1, 2, 3, 4, 5)),
                                                               _valid_affine(out[1], 0))),
        ("load_volume", lambda: load_volume(path, 3), lambda out: (_valid_array(out[0], (3,)),
                                                                   _valid_affine(out[1], 3))),
        ("load_native", lambda: load_native(path, "fixed"),
         lambda out: (_valid_array(out.array, (2, 3)), _valid_affine(out.affine, out.array.ndim))),
        ("label chain", lambda: chain(None), check_chain),
        ("image+label chain", lambda: chain("image"), check_chain),
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(nifti_files())
def test_random_nifti_files_give_a_valid_result_or_our_error_never_a_crash_or_hang(tmp_path, case):
    raw, suffix = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    for name, call, check in _loaders(path):
        with deadline(30), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = call()
            except DatasetError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc), (name, str(exc))
                continue
        check(out)
