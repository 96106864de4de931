"""Peers: classical registration tools on the same pairs: ANTs SyN (antspyx), elastix B-spline (itk-elastix) and
FireANTs (the GPU peer: affine then greedy diffeomorphic, PyTorch).

Each registrar maps a pair of arrays on one grid (fixed, moving: (*S) float32, isotropic ``spacing_mm``) to a
displacement field ``(ndim, *S)`` in voxels in deepsim's convention (:mod:`deepsim.spatial`: the moving image is
read at x + u(x)), so the same warp and metric code scores every method. Both tools run on the voxel grid with
identity direction and zero origin: their physical displacements are then voxel displacements times the spacing.

The tools are an optional extra, ``pip install ".[compare]"`` from the repository (antspyx, itk-elastix, fireants
and the SimpleITK it reads images with); a missing one raises ConfigError saying so.
Every parameter is stated here (and logged by ``deepsim compare``).
"""

from deepsim.peers.ants import AntsSyN
from deepsim.peers.elastix import ElastixBSpline
from deepsim.peers.fireants import FireANTs

__all__ = ["AntsSyN", "ElastixBSpline", "FireANTs", "CLASSICAL_METHODS", "TOOL_MODULES"]

#: the classical methods `deepsim compare` knows, by name
CLASSICAL_METHODS = {"ants-syn": AntsSyN, "elastix-bspline": ElastixBSpline, "fireants": FireANTs}
#: the modules each classical method imports, and the package that provides each (for install hints)
TOOL_MODULES = {"ants-syn": {"ants": "antspyx"}, "elastix-bspline": {"itk": "itk-elastix"},
                "fireants": {"fireants": "fireants", "SimpleITK": "SimpleITK"}}
