"""The classical baselines' fields come back in deepsim's voxel convention (a known shift is recovered)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from deepsim.peers import AntsSyN, ElastixBSpline, FireANTs


def _blobs(shape=(40, 44, 36), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    for _ in range(25):
        centre = [rng.uniform(8, n - 8) for n in shape]
        image[tuple(int(c) for c in centre)] = rng.uniform(0.5, 1.0)
    return ndi.gaussian_filter(image, 2.5) * 50


@pytest.mark.slow
@pytest.mark.parametrize("registrar, module", [(AntsSyN(reg_iterations=(20, 10, 0)), "ants"),
                                               (ElastixBSpline(iterations=60, resolutions=2), "itk"),
                                               (FireANTs(affine_iterations=(30, 30, 20, 10), iterations=(40, 20, 10),
                                                         device="cpu"), "fireants")],
                         ids=["ants-syn", "elastix-bspline", "fireants"])
def test_a_known_shift_is_recovered_in_voxels_along_our_axes(registrar, module, tmp_path, monkeypatch):
    """moving[x] = fixed[x - s] for s = (2, -1, 3) voxels, so moving read at x + u(x) matches fixed for u = s;
    and the tools leave no files behind in the working directory (transformix used to write one there)."""
    monkeypatch.chdir(tmp_path)
    pytest.importorskip(module)
    if module == "itk":
        import itk

        if not hasattr(itk, "elastix_registration_method"):
            pytest.skip("itk-elastix not installed")
    fixed = _blobs()
    shift = np.array([2.0, -1.0, 3.0])
    moving = ndi.shift(fixed, shift, order=1).astype(np.float32)
    ddf = registrar(fixed, moving, spacing_mm=2.0)
    assert ddf.shape == (3, *fixed.shape)
    inner = (slice(None),) + (slice(8, -8),) * 3
    recovered = np.median(ddf[inner].reshape(3, -1), axis=1)
    assert np.allclose(recovered, shift, atol=0.3), recovered
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_fireants_prints_nothing_on_our_stdout(tmp_path):
    """Importing fireants prints three 'FFO' lines; a comparison's stdout is for its table alone."""
    import subprocess
    import sys

    pytest.importorskip("fireants")
    code = ("import numpy as np; from deepsim.peers import FireANTs; "
            "f = np.zeros((40, 44, 36), np.float32); f[10:30, 12:32, 8:28] = 1; "
            "FireANTs(affine_iterations=(5, 5, 5, 5), iterations=(5, 5, 5), device='cpu')(f, f, 2.0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""
