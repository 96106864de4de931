"""The registration pipeline: affine → network → instance optimisation, composed in one place.

Every entry point that registers a pair — ``deepsim register`` (:mod:`.inference`), ``deepsim compare``, the
evaluation stage of ``deepsim run`` and the bundles' ``inference.json`` — builds a :class:`Registrar` and calls
it, so a stage is switched on or off the same way everywhere, and the ablation rows of a comparison are this same
code with a stage left out.

The stages, each optional:

1. :class:`~deepsim.registration.affine.AffineRegistration` on the two images in their own grids and world
   spaces, giving ``T`` (fixed world point -> moving world point);
2. both images resampled onto the working grid (the fixed image's field of view at the network's spacing, RAS,
   a size the network accepts), the moving one through ``T``;
3. the network's displacement ``u₀`` (voxels of the working grid);
4. :class:`~deepsim.registration.instance.InstanceOptimisation` from ``u₀`` (or from zero).

The whole transform maps a fixed world point ``x`` to ``T(x + u(x))`` in the moving image (``u`` in mm):
:meth:`Registration.target_points` evaluates it on any grid, so the moving image is interpolated once, from its
own voxels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from deepsim.geometry import (Grid, apply_affine, clamp_to_grid, grid_points, homogeneous, linear_part, resample_onto,
                              sample_at, working_grid)
from deepsim.registration.affine import AffineRegistration, AffineResult
from deepsim.registration.fields import (ddf_to_normalised, identity_normalised, invert_displacement,
                                         normalised_to_ddf, sample)
from deepsim.registration.instance import InstanceOptimisation, InstanceResult, test_time_loss
from deepsim.spatial import ddf_voxel_to_world

__all__ = ["HYBRID", "Registrar", "Registration", "method_registrar", "parse_method", "registrar_params",
           "is_our_method"]

#: the suffix of a hybrid method name: ``<loss>+io`` is the affine stage, the ``<loss>`` network, then instance
#: optimisation with that loss
HYBRID = "+io"


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Registration:
    """One registered pair. ``matrix``: (4, 4) fixed world -> moving world (identity without an affine stage);
    ``ddf``: (1, ndim, *G) displacement in voxels of the working ``grid`` after the deformable stages;
    ``timings``: seconds per stage; ``affine`` / ``instance``: the stages' own results (or None);
    ``inverse_ddf``: (1, ndim, *G) voxels, the inverse of the deformable part (id + ddf)⁻¹ on the working grid, as
    the instance optimisation computed it (None: inverted from ``ddf`` when first asked for, :meth:`inverse`)."""

    matrix: np.ndarray
    ddf: torch.Tensor
    grid: Grid
    timings: dict[str, float] = field(default_factory=dict)
    affine: AffineResult | None = None
    instance: InstanceResult | None = None
    inverse_ddf: torch.Tensor | None = None

    def inverse(self) -> torch.Tensor:
        """(id + ddf)⁻¹ − id, (1, ndim, *G) voxels of the working grid: the instance optimisation's inverse, or
        ``ddf`` inverted by Newton's method (:func:`~deepsim.registration.fields.invert_displacement`)."""
        if self.inverse_ddf is None:
            self.inverse_ddf = normalised_to_ddf(invert_displacement(ddf_to_normalised(self.ddf.float())))
        return self.inverse_ddf

    def inverse_points(self, grid: Grid, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, φ⁻¹(y)): the world points (ndim, *grid.shape) of ``grid`` (typically the moving image's) and where the
        inverse transform sends them in the fixed image's world: z = T⁻¹(y), then z + v(z) with v the inverse field
        (mm), read at z on the working grid (points outside it read its border)."""
        y = grid_points(grid, self.ddf.device, dtype)
        z = y if np.allclose(self.matrix, np.eye(4)) else apply_affine(np.linalg.inv(self.matrix), y)
        v_mm = ddf_voxel_to_world(self.inverse().to(dtype), torch.as_tensor(self.grid.affine))[0]
        return y, z + sample_at(v_mm, self.grid.affine, clamp_to_grid(z, self.grid)).to(dtype)

    def inverse_consistency(self) -> dict[str, float]:
        """‖φ⁻¹(φ(x)) − x‖ over the working grid's voxels x whose image φ(x) lies inside the grid (the affine part
        cancels exactly, so this is the deformable part's error): mean and max, in voxels and in mm."""
        with torch.no_grad():
            u, v = self.ddf.float(), self.inverse().float()
            u_norm, v_norm = ddf_to_normalised(u), ddf_to_normalised(v)
            error = u + normalised_to_ddf(sample(v_norm, u_norm))  # voxels: x + u(x) + v(x + u(x)) − x
            inside = ((u_norm + identity_normalised(u_norm)).abs() <= 1.0).all(dim=1)[0]
            linear = torch.as_tensor(linear_part(self.grid.affine, self.grid.ndim), dtype=u.dtype, device=u.device)
            voxels = error[0].norm(dim=0)[inside]
            mm = torch.einsum("ij,j...->i...", linear, error[0]).norm(dim=0)[inside]
        if voxels.numel() == 0:
            return {"mean_voxels": float("nan"), "max_voxels": float("nan"), "mean_mm": float("nan"),
                    "max_mm": float("nan")}
        return {"mean_voxels": float(voxels.mean()), "max_voxels": float(voxels.max()),
                "mean_mm": float(mm.mean()), "max_mm": float(mm.max())}

    def target_points(self, grid: Grid, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, T(x + u(x))): the world points (ndim, *grid.shape) of ``grid`` and where the transform sends them."""
        x = grid_points(grid, self.ddf.device, dtype)
        u_mm = ddf_voxel_to_world(self.ddf.to(dtype), torch.as_tensor(self.grid.affine))[0]
        target = x + resample_onto(u_mm, self.grid.affine, grid).to(dtype)
        if not np.allclose(self.matrix, np.eye(4)):
            target = apply_affine(self.matrix, target)
        return x, target

    def voxel_ddf(self, moving_affine: np.ndarray | None = None) -> torch.Tensor:
        """The whole transform as a displacement (1, ndim, *G) in voxels of the working grid, for a moving image
        that lies on a grid with ``moving_affine`` (default: the working grid's) — what MONAI's ``Warp`` and our
        metrics take when fixed and moving share one grid."""
        ndim = self.grid.ndim
        moving_affine = self.grid.affine if moving_affine is None else moving_affine
        if np.allclose(self.matrix, np.eye(4)) and np.allclose(moving_affine, self.grid.affine):
            return self.ddf.float()  # no affine, one grid: the field is the whole transform already
        index = grid_points(Grid(self.grid.shape, np.eye(4)), self.ddf.device, torch.float64)
        _, target = self.target_points(self.grid, torch.float64)
        to_voxel = torch.as_tensor(np.linalg.inv(homogeneous(moving_affine, ndim)), device=target.device)
        return (apply_affine(to_voxel, target) - index).float()[None]


@dataclass
class Registrar:
    """Affine, network and instance optimisation, each optional (see the module docstring).

    Args:
        affine: the affine stage, or None (the inputs' own world alignment is kept).
        network: ``network(moving, fixed)`` -> displacement (1, ndim, *G) voxels, inputs (1, 1, *G); or None.
        optimiser: the instance optimisation stage, or None.
        spacing_mm: the working grid's spacing (the network's training spacing); None: the fixed image's own grid.
        size_multiple: working grid sizes are rounded up to this (the network's size divisor).
    """

    affine: AffineRegistration | None = None
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    optimiser: InstanceOptimisation | None = None
    spacing_mm: float | None = None
    size_multiple: int = 1

    @property
    def stages(self) -> list[str]:
        """Names of the stages switched on, in order."""
        return [name for name, stage in (("affine", self.affine), ("network", self.network),
                                          ("instance_optimisation", self.optimiser)) if stage is not None]

    def working_grid(self, fixed_grid: Grid) -> Grid:
        if self.spacing_mm is None and self.size_multiple == 1:
            return fixed_grid
        spacing = self.spacing_mm
        if spacing is None:
            spacing = np.linalg.norm(homogeneous(fixed_grid.affine, fixed_grid.ndim)[:-1, :-1], axis=0)
        return working_grid(fixed_grid, spacing, self.size_multiple)

    def on_grid(self, fixed: torch.Tensor, moving: torch.Tensor, spacing_mm: float) -> Registration:
        """Register ``fixed`` and ``moving`` (*S each) that lie on one grid of isotropic ``spacing_mm`` voxels (the
        preprocessed pairs of a ``deepsim run``)."""
        ndim = fixed.ndim
        grid_affine = np.diag([float(spacing_mm)] * ndim + [1.0] * (4 - ndim))
        return self(fixed, grid_affine, moving, grid_affine)

    def __call__(self, fixed: torch.Tensor, fixed_affine: np.ndarray, moving: torch.Tensor,
                 moving_affine: np.ndarray, progress: bool = False) -> Registration:
        """fixed (*S), moving (*S') intensity images (scaled to about [0, 1]) on one device, each with its
        voxel -> RAS affine. Returns the :class:`Registration`."""
        device = fixed.device
        timings: dict[str, float] = {}
        fixed_grid = Grid(tuple(int(n) for n in fixed.shape), np.asarray(fixed_affine, dtype=np.float64))

        t0 = time.perf_counter()
        affine_result, matrix = None, np.eye(4)
        if self.affine is not None:
            affine_result = self.affine(fixed, fixed_affine, moving, moving_affine)
            matrix = affine_result.matrix
        _synchronise(device)
        timings["affine_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        grid = self.working_grid(fixed_grid)
        # padding beyond the fixed field of view repeats its border in both images (through the same points):
        # zeros there would meet moving content and pull the field at the border
        f_work = resample_onto(fixed.float(), fixed_affine, grid, box=fixed_grid)[None, None]
        m_work = resample_onto(moving.float(), moving_affine, grid, box=fixed_grid,
                               transform=None if self.affine is None else matrix)[None, None]
        _synchronise(device)
        timings["resample_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ddf = None
        if self.network is not None:
            with torch.no_grad():
                ddf = self.network(m_work, f_work).float()
        _synchronise(device)
        timings["network_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        instance, inverse = None, None
        if self.optimiser is not None:
            instance = self.optimiser(m_work, f_work, ddf, progress=progress)
            ddf, inverse = instance.ddf, instance.inverse_ddf
        if ddf is None:
            ddf = torch.zeros(1, grid.ndim, *grid.shape, device=device)
            inverse = ddf
        _synchronise(device)
        timings["instance_optimisation_s"] = time.perf_counter() - t0
        return Registration(matrix, ddf, grid, timings, affine_result, instance, inverse)


def parse_method(method: str) -> tuple[bool, str | None, str | None]:
    """A method name as (affine stage?, network loss or None, instance optimisation loss or None).

    ``identity``; ``affine``; ``affine+io`` (local NCC); ``<loss>`` (the network alone, no affine: as trained);
    ``affine+<loss>`` (affine, then the network); ``<loss>+io`` (affine, network, optimisation with ``<loss>``, or
    local NCC for ``ncc-sup`` and ``dice``); ``<net>+io-<loss>`` and ``affine+io-<loss>`` (the optimisation loss named
    explicitly, e.g. ``ncc+io-deepsim-seg``: the NCC network's field refined with the DeepSim-seg loss).
    """
    if method == "identity":
        return False, None, None
    head, io, io_loss = method.partition(HYBRID)
    if io and io_loss and not io_loss.startswith("-"):
        raise ValueError(f"method {method!r}: expected <net>+io or <net>+io-<loss>")
    affine = bool(io) or head == "affine" or head.startswith("affine+")
    network = head.removeprefix("affine+") if head.startswith("affine+") else (None if head == "affine" else head)
    if not io:
        return affine, network, None
    optimiser_loss = io_loss[1:] if io_loss else test_time_loss(network)
    return True, network, optimiser_loss


def is_our_method(method: str, trained: list[str]) -> bool:
    """Whether ``method`` names stages of ours (see :func:`parse_method`) with networks among ``trained``."""
    try:
        _, network, _ = parse_method(method)
    except ValueError:
        return False
    return network is None or network in trained


def method_registrar(method: str, models_dir, device: torch.device | str = "cpu",
                     affine_metric: str = "ncc") -> Registrar:
    """The :class:`Registrar` a method name stands for (:func:`parse_method`), in ``deepsim compare`` and the
    evaluation stage alike: every stage with its default settings, networks from ``models_dir/registration_<loss>.pt``
    and feature nets (DeepSim losses) from ``models_dir/feature_<kind>.pt``. A missing checkpoint raises
    ConfigError. ``affine_metric``: the affine stage's metric (``"mi"`` for pairs of different contrasts)."""
    from deepsim.engine.checkpoints import load_network, registration_checkpoint_path
    from deepsim.errors import ConfigError
    from deepsim.registration.instance import instance_similarity

    device = torch.device(device)
    try:
        affine, loss, io_loss = parse_method(method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    network = None
    if loss is not None:
        path = registration_checkpoint_path(models_dir, loss)
        if not path.is_file():
            raise ConfigError(f"{path}: no trained model for method {method!r}")
        network = load_network(path, map_location=device, builder="registration_net").to(device).eval()
    optimiser = None
    if io_loss is not None:
        spatial_dims = int(getattr(network, "spatial_dims", 3))
        try:
            similarity = instance_similarity(io_loss, spatial_dims, models_dir, device)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"method {method!r}: {exc}") from exc
        optimiser = InstanceOptimisation(similarity, loss_name=io_loss)
    return Registrar(affine=AffineRegistration(metric=affine_metric) if affine else None, network=network,
                     optimiser=optimiser)


def registrar_params(registrar: Registrar) -> dict:
    """The settings of a Registrar's stages, flat (``affine/...``, ``io/...``), for MLflow params and reports."""
    from dataclasses import fields

    params: dict = {"stages": "+".join(registrar.stages) or "none"}
    for prefix, stage in (("affine", registrar.affine), ("io", registrar.optimiser)):
        if stage is not None:  # fields, not asdict: asdict would deep-copy the similarity's feature net
            params.update({f"{prefix}/{f.name}": getattr(stage, f.name) for f in fields(stage)
                           if f.name != "similarity"})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
