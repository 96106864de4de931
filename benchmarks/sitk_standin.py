"""A stand-in for the few SimpleITK calls FireANTs makes to read arrays, for GPU machines without SimpleITK.

FireANTs (PyPI ``fireants``) registers with PyTorch alone; SimpleITK is only its image container: ``fireants.io.
image.Image`` reads the voxel array, spacing, origin, direction and size of a ``SimpleITK.Image``. On our lent GPU
machine a call carries at most 64 MiB, and the SimpleITK wheel (52 MB) does not fit beside the 1 mm test pairs,
so ``benchmarks/compare_1mm_gpu.py`` hands FireANTs its arrays through this module instead: an image object with
those getters (and the setters ``deepsim.peers.FireANTs`` uses), installed as ``SimpleITK`` only
when the real one is missing. FireANTs' registration code runs unchanged. ``python benchmarks/sitk_standin.py``
checks, where SimpleITK is installed, that FireANTs gives the same field through both.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np

__all__ = ["install", "standin_module"]


class Image:
    """An array with spacing, origin and direction, in SimpleITK's conventions (size and spacing x first, the
    array's last axis is x)."""

    def __init__(self, array: np.ndarray):
        self._array = np.asarray(array)
        ndim = self._array.ndim
        self._spacing, self._origin = (1.0,) * ndim, (0.0,) * ndim
        self._direction = tuple(np.eye(ndim).ravel())

    def GetDimension(self) -> int:  # noqa: N802 (SimpleITK's names)
        return self._array.ndim

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802
        return tuple(int(n) for n in self._array.shape[::-1])

    def GetNumberOfComponentsPerPixel(self) -> int:  # noqa: N802
        return 1

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
        return self._spacing

    def SetSpacing(self, spacing) -> None:  # noqa: N802
        self._spacing = tuple(float(s) for s in spacing)

    def GetOrigin(self) -> tuple[float, ...]:  # noqa: N802
        return self._origin

    def SetOrigin(self, origin) -> None:  # noqa: N802
        self._origin = tuple(float(o) for o in origin)

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        return self._direction

    def SetDirection(self, direction) -> None:  # noqa: N802
        self._direction = tuple(float(d) for d in direction)


def standin_module() -> types.ModuleType:
    """A module named SimpleITK with ``Image``, ``GetImageFromArray`` and ``GetArrayFromImage``."""
    module = types.ModuleType("SimpleITK")
    module.__spec__ = importlib.machinery.ModuleSpec("SimpleITK", None)  # importlib.util.find_spec looks for it
    module.Image = Image
    module.SimpleITK = module  # FireANTs annotates with ``sitk.SimpleITK.Image``
    module.GetImageFromArray = lambda array, isVector=False: Image(array)  # noqa: N815
    module.GetArrayFromImage = lambda image: np.array(image._array, copy=True)  # noqa: N815
    module.__deepsim_standin__ = True
    return module


def install() -> bool:
    """Make ``import SimpleITK`` give the stand-in if SimpleITK is not installed; True if it did."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        sys.modules["SimpleITK"] = standin_module()
        return True
    return False


if __name__ == "__main__":  # the check: FireANTs through real SimpleITK and through the stand-in agree

    import torch

    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij")
    fixed = np.exp(-((grid[0] - 0.1) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2) * 4).astype(np.float32)
    moving = np.exp(-((grid[0] + 0.05) ** 2 + (grid[1] - 0.1) ** 2 + grid[2] ** 2) * 5).astype(np.float32)
    from deepsim.peers import FireANTs

    tool = FireANTs(affine_iterations=(20, 10, 5, 5), iterations=(20, 10, 5), device="cpu")
    torch.manual_seed(0)
    real = tool(fixed, moving, 2.0)
    for name in [m for m in sys.modules if m == "SimpleITK" or m.startswith(("SimpleITK.", "fireants"))]:
        del sys.modules[name]
    sys.modules["SimpleITK"] = standin_module()
    importlib.invalidate_caches()
    torch.manual_seed(0)
    standin = tool(fixed, moving, 2.0)
    print(f"max |field difference| = {np.abs(real - standin).max():.3g} voxels "
          f"(field up to {np.abs(real).max():.3g} voxels)")
