"""Classical registration baselines on the same pairs: ANTs SyN (antspyx), elastix B-spline (itk-elastix) and
FireANTs (the GPU peer: affine then greedy diffeomorphic, PyTorch).

Each registrar maps a pair of arrays on one grid (fixed, moving: (*S) float32, isotropic ``spacing_mm``) to a
displacement field ``(ndim, *S)`` in voxels in deepsim's convention (:mod:`deepsim.spatial`: the moving image is
read at x + u(x)), so the same warp and metric code scores every method. Both tools run on the voxel grid with
identity direction and zero origin: their physical displacements are then voxel displacements times the spacing.

The tools are an optional extra, ``pip install ".[compare]"`` from the repository (antspyx, itk-elastix, fireants
and the SimpleITK it reads images with); a missing one raises ConfigError saying so.
Every parameter is stated here (and logged by ``deepsim compare``).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from deepsim.errors import ConfigError

__all__ = ["AntsSyN", "ElastixBSpline", "FireANTs", "CLASSICAL_METHODS", "TOOL_MODULES"]

_EXTRA = 'pip install antspyx==0.6.3 itk-elastix==0.25.4 fireants==1.5.0 SimpleITK (the "compare" extra)'


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{package} is not installed; the classical baselines need it: {_EXTRA}") from exc


def _params(tool) -> dict:
    """A tool's settings for logs and reports: its dataclass fields but the name, tuples as lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(tool).items() if k != "name"}


@dataclass(frozen=True)
class AntsSyN:
    """ANTs: affine (Mattes MI) then SyN with the CC metric, through ``ants.registration(type_of_transform="SyN")``.

    ``syn_sampling`` is the CC radius in voxels; ``reg_iterations`` the SyN iterations per level (coarse to fine,
    shrink factors 4, 2, 1 by antspyx's defaults for three levels); ``grad_step``, ``flow_sigma``, ``total_sigma``
    the SyN step and the update/total field smoothing (voxels). ``random_seed`` fixes ANTs' metric sampling.
    """

    aff_metric: str = "mattes"
    syn_metric: str = "CC"
    syn_sampling: int = 2
    reg_iterations: tuple[int, ...] = (40, 20, 0)
    grad_step: float = 0.2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0
    random_seed: int = 1
    name: str = "ants-syn"

    def params(self) -> dict:
        return _params(self)

    def __call__(self, fixed: np.ndarray, moving: np.ndarray, spacing_mm: float) -> np.ndarray:
        ants = _require("ants", "antspyx")
        spacing = (float(spacing_mm),) * fixed.ndim
        f = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=spacing)
        m = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=spacing)
        workdir = tempfile.mkdtemp(prefix="deepsim-ants-")
        try:
            result = ants.registration(f, m, type_of_transform="SyN", aff_metric=self.aff_metric,
                                       syn_metric=self.syn_metric, syn_sampling=self.syn_sampling,
                                       reg_iterations=self.reg_iterations, grad_step=self.grad_step,
                                       flow_sigma=self.flow_sigma, total_sigma=self.total_sigma,
                                       random_seed=self.random_seed, outprefix=f"{workdir}/reg_")
            # affine + warp composed into one displacement field on the fixed grid (physical = voxels x spacing)
            composite = ants.apply_transforms(f, m, transformlist=result["fwdtransforms"],
                                              compose=f"{workdir}/composite_")
            field = ants.image_read(composite).numpy()  # (*S, ndim), components along the array axes, mm
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return np.moveaxis(field, -1, 0).astype(np.float32) / float(spacing_mm)


@dataclass(frozen=True)
class ElastixBSpline:
    """elastix: affine then B-spline, elastix's default parameter maps with these changes.

    ``grid_spacing_mm`` is the B-spline control-point spacing at the finest level; ``iterations`` the optimiser
    iterations per resolution (adaptive stochastic gradient descent, ``resolutions`` levels; 100 instead of the
    default 250, which took 55 s per pair even on 32³ test volumes on our 2-core CPU), metric
    ``AdvancedMattesMutualInformation`` (the default maps'). ``seed`` fixes the random sampler.
    """

    grid_spacing_mm: float = 10.0
    iterations: int = 100
    resolutions: int = 3
    seed: int = 1
    name: str = "elastix-bspline"
    overrides: dict = field(default_factory=dict)

    def params(self) -> dict:
        return _params(self)

    def _parameter_object(self, itk):
        po = itk.ParameterObject.New()
        for kind in ("affine", "bspline"):
            pmap = po.GetDefaultParameterMap(kind, self.resolutions)
            pmap["MaximumNumberOfIterations"] = [str(self.iterations)]
            pmap["RandomSeed"] = [str(self.seed)]
            if kind == "bspline":
                pmap["FinalGridSpacingInPhysicalUnits"] = [str(self.grid_spacing_mm)]
            for key, value in self.overrides.items():
                pmap[key] = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            po.AddParameterMap(pmap)
        return po

    def __call__(self, fixed: np.ndarray, moving: np.ndarray, spacing_mm: float) -> np.ndarray:
        itk = _require("itk", "itk-elastix")
        if not hasattr(itk, "elastix_registration_method"):
            raise ConfigError(f"itk is installed without elastix; the classical baselines need it: {_EXTRA}")
        ndim = fixed.ndim

        def to_itk(array: np.ndarray):
            # ITK's array view is (z, y, x): reverse the axes so ITK's index i is our first axis
            image = itk.image_from_array(np.ascontiguousarray(np.transpose(array.astype(np.float32))))
            image.SetSpacing([float(spacing_mm)] * ndim)
            return image

        f, m = to_itk(fixed), to_itk(moving)
        workdir = tempfile.mkdtemp(prefix="deepsim-elastix-")
        try:
            _, transform = itk.elastix_registration_method(f, m, parameter_object=self._parameter_object(itk),
                                                           log_to_console=False)
            # transformix writes deformationField.nii into its output directory (the current one by default)
            field = itk.transformix_deformation_field(m, transform, output_directory=workdir)
            field = itk.array_from_image(field)  # (*S reversed, ndim), mm
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        field = np.transpose(field, (*range(ndim - 1, -1, -1), ndim))  # back to our axis order, (*S, ndim)
        return np.moveaxis(field, -1, 0).astype(np.float32) / float(spacing_mm)


@dataclass(frozen=True)
class FireANTs:
    """FireANTs 1.5 (Jena et al., 2024): affine, then greedy diffeomorphic registration with compositive updates, on
    the GPU when there is one (``device``), with the settings of its own brain benchmark script
    (``fireants/scripts/pairwise/test_lpba40.py``): affine on shrink 8, 4, 2, 1 for 100, 50, 25, 20 Adam steps
    (lr 3e-4, local CC over 5 voxels); greedy on shrink 4, 2, 1 for 200, 100, 50 steps (lr 0.5, CC over 7 voxels,
    gradient σ 2, warp σ 0.5 voxels). Images go in through SimpleITK, as FireANTs reads them; its ``"cc"`` loss
    (the fused CUDA kernels are a separate build, not on PyPI).
    """

    affine_scales: tuple[int, ...] = (8, 4, 2, 1)
    affine_iterations: tuple[int, ...] = (100, 50, 25, 20)
    affine_lr: float = 3e-4
    affine_cc_kernel: int = 5
    scales: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (200, 100, 50)
    cc_kernel: int = 7
    smooth_grad_sigma: float = 2.0
    smooth_warp_sigma: float = 0.5
    lr: float = 0.5
    device: str = ""
    name: str = "fireants"

    def params(self) -> dict:
        return _params(self)

    def __call__(self, fixed: np.ndarray, moving: np.ndarray, spacing_mm: float) -> np.ndarray:
        import logging

        sitk = _require("SimpleITK", "SimpleITK")
        _require("fireants", "fireants")
        import torch

        logging.getLogger("fireants").setLevel(logging.WARNING)  # an INFO line per level and stage otherwise
        with contextlib.redirect_stdout(io.StringIO()):  # its import prints three "FFO" lines onto our stdout
            from fireants.io.image import BatchedImages, Image
            from fireants.registration.affine import AffineRegistration
            from fireants.registration.greedy import GreedyRegistration

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ndim = fixed.ndim

        def batch(array: np.ndarray):
            # GetImageFromArray reads the array's axes as (z, y, x) and FireANTs reads them back the same way, so its
            # tensor axes are ours; isotropic spacing, identity direction, zero origin
            image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
            image.SetSpacing([float(spacing_mm)] * ndim)
            return BatchedImages([Image(image, device=device)])

        f, m = batch(fixed), batch(moving)
        affine = AffineRegistration(list(self.affine_scales), list(self.affine_iterations), f, m, loss_type="cc",
                                    optimizer="Adam", optimizer_lr=self.affine_lr, cc_kernel_size=self.affine_cc_kernel,
                                    progress_bar=False)
        affine.optimize()
        greedy = GreedyRegistration(scales=list(self.scales), iterations=list(self.iterations), fixed_images=f,
                                    moving_images=m, loss_type="cc", cc_kernel_size=self.cc_kernel,
                                    deformation_type="compositive", smooth_grad_sigma=self.smooth_grad_sigma,
                                    smooth_warp_sigma=self.smooth_warp_sigma, optimizer="adam", optimizer_lr=self.lr,
                                    init_affine=affine.get_affine_matrix().detach(), progress_bar=False)
        greedy.optimize()
        with torch.no_grad():
            grid = greedy.get_warped_coordinates(f, m)[0]  # (*S, ndim): normalised, x (last tensor axis) first
            shape = torch.tensor(fixed.shape, dtype=grid.dtype, device=grid.device)
            voxel = (grid.flip(-1) + 1.0) * (shape - 1) / 2.0  # our tensor-axis order, voxel units
            index = torch.stack(torch.meshgrid(*[torch.arange(n, device=grid.device, dtype=grid.dtype)
                                                 for n in fixed.shape], indexing="ij"), dim=-1)
            ddf = (voxel - index).movedim(-1, 0)
        return ddf.float().cpu().numpy()


#: the classical methods `deepsim compare` knows, by name
CLASSICAL_METHODS = {"ants-syn": AntsSyN, "elastix-bspline": ElastixBSpline, "fireants": FireANTs}
#: the modules each classical method imports, and the package that provides each (for install hints)
TOOL_MODULES = {"ants-syn": {"ants": "antspyx"}, "elastix-bspline": {"itk": "itk-elastix"},
                "fireants": {"fireants": "fireants", "SimpleITK": "SimpleITK"}}
