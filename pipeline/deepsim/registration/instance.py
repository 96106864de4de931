"""Test-time instance optimisation: a diffeomorphic transform fitted to one pair (or a batch) on a pyramid.

What the accurate classical tools do (ANTs SyN, FireANTs), written for our fields. The transform is fitted coarse
to fine (default shrink 4, 2, 1; images blurred with σ = shrink / 2 voxels) to minimise ``similarity(m ∘ φ, f)``;
the gradient is smoothed with a Gaussian before each step (SyN's "update field" smoothing, which keeps the
updates fluid-like), and a level ends when the loss has not improved by ``tolerance`` for ``patience`` steps (a
plateau) or after its iteration budget. Two transform models:

- ``"greedy"`` (default): φ is updated by composition, φ ← φ ∘ (id + δ), with δ the smoothed, Adam-normalised
  gradient step, at most ``learning_rate`` voxels long, and the displacement smoothed a little after each step
  (the scheme of ANTs' greedy SyN and FireANTs). Every step is a small smooth displacement, hence invertible, and
  so is their composition: no folding, and one warp per step.
- ``"svf"``: φ = exp(v), the flow of a stationary velocity field integrated by scaling and squaring, v fitted by
  Adam (optionally on a coarser grid than the images at the finest level). Diffeomorphic for any smooth v, but
  each step back-propagates through the whole integration: several times the cost of a greedy step.

The start is a network's predicted displacement ``u₀`` (greedy: φ₀ = id + u₀; svf: v₀ = u₀, since
exp(u₀) ≈ id + u₀ for smooth, moderate fields), or the identity. Fields inside are in grid_sample's normalised
units ([-1, 1] across each axis, in our tensor-axis order), so a level change needs no rescaling; what goes in and
comes out is a displacement in voxels of the full grid (:mod:`deepsim.spatial`'s convention). Everything runs on
the inputs' device; identity grids are built once per shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from deepsim.filters import downsample, gaussian_smooth, level_shape
from deepsim.registration.plateau import Plateau

__all__ = ["InstanceOptimisation", "InstanceResult", "instance_similarity", "test_time_loss", "LABEL_LOSSES",
           "integrate_velocity", "ddf_to_normalised", "normalised_to_ddf", "TEST_TIME_SETTINGS"]

#: Settings of a similarity at test time that differ from training: local NCC over 5-voxel windows (ANTs' CC
#: radius 2) rather than the paper's 9, measured better for instance optimisation on the 2 mm brains
#: (benchmarks/results/instance_optimisation_cpu.md).
TEST_TIME_SETTINGS: dict[str, dict] = {"ncc": {"window": 5}}


#: losses that compare label maps, which a pair to register does not have: their networks are refined with local NCC
LABEL_LOSSES = ("ncc-sup", "dice")


def test_time_loss(network_loss: str | None) -> str:
    """The instance optimisation loss for a network trained with ``network_loss``: its own, or local NCC where
    that loss needs labels (or there is no network)."""
    return "ncc" if network_loss is None or network_loss in LABEL_LOSSES else network_loss


def instance_similarity(name: str, spatial_dims: int, models_dir=None, device: torch.device | str = "cpu") -> nn.Module:
    """The similarity ``name`` (``ncc``, ``mse``, ``mind``, ``nmi``, ``deepsim-ae``, ``deepsim-seg``) as a test-time
    loss; the DeepSim losses load ``<models_dir>/feature_<kind>.pt``. ``ncc-sup`` needs labels: ValueError."""
    from deepsim.registration.objective import build_objective

    if name in LABEL_LOSSES:
        raise ValueError(f"{name} compares label maps, which a pair to register does not have; use ncc")
    return build_objective(name, 0.0, spatial_dims, models_dir, device, **TEST_TIME_SETTINGS.get(name, {})).similarity

_GRIDS: dict[tuple, torch.Tensor] = {}


def _identity(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """grid_sample's identity grid (1, *S, ndim), coordinates in (x, y[, z]) = reversed tensor-axis order."""
    key = (tuple(shape), device, dtype)
    if key not in _GRIDS:
        if len(_GRIDS) > 16:
            _GRIDS.clear()
        ndim = len(shape)
        theta = torch.eye(ndim, ndim + 1, device=device, dtype=dtype)[None]
        _GRIDS[key] = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    return _GRIDS[key]


def _as_grid(u: torch.Tensor) -> torch.Tensor:
    """Normalised displacement (B, ndim, *S), tensor-axis order -> absolute sampling grid (B, *S, ndim), x first."""
    ndim = u.shape[1]
    return _identity(u.shape[2:], u.device, u.dtype) + u.permute(0, *range(2, ndim + 2), 1).flip(-1)


def sample(image: torch.Tensor, u: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``image`` (B, C, *S) read at x + u(x), u (B, ndim, *S) normalised -> (B, C, *S); linear interpolation."""
    return F.grid_sample(image, _as_grid(u), mode="bilinear", padding_mode=padding, align_corners=True)


def integrate_velocity(v: torch.Tensor, steps: int) -> torch.Tensor:
    """exp(v) by scaling and squaring: u ← v / 2^steps, then ``steps`` times u ← u + u ∘ (id + u).

    v: (B, ndim, *S) normalised velocity -> (B, ndim, *S) normalised displacement of the flow at time 1."""
    u = v / (2 ** steps)
    for _ in range(steps):
        u = u + sample(u, u)
    return u


def ddf_to_normalised(ddf: torch.Tensor) -> torch.Tensor:
    """Voxel displacement (B, ndim, *S) -> grid_sample's normalised units (align_corners=True)."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in ddf.shape[2:]], device=ddf.device, dtype=ddf.dtype)
    return ddf * scale.view(1, -1, *[1] * (ddf.ndim - 2))


def normalised_to_ddf(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ddf_to_normalised`."""
    scale = torch.tensor([max(n - 1, 1) / 2.0 for n in u.shape[2:]], device=u.device, dtype=u.dtype)
    return u * scale.view(1, -1, *[1] * (u.ndim - 2))


def _resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A normalised field moved to another grid shape (linear; blurred first when shrinking)."""
    if tuple(u.shape[2:]) == tuple(shape):
        return u
    if all(m >= n for m, n in zip(shape, u.shape[2:])):
        mode = "trilinear" if u.ndim == 5 else "bilinear"
        return F.interpolate(u, size=tuple(shape), mode=mode, align_corners=True)
    return downsample(u, shape)


def _diffusion(v: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of ``v`` (B, ndim, *S) along every axis (in its own units)."""
    return sum(torch.diff(v, dim=2 + axis).pow(2).mean() for axis in range(v.ndim - 2))


@dataclass(frozen=True)
class InstanceResult:
    """``ddf``: (B, ndim, *S) voxel displacement of exp(v) on the full grid; ``velocity``: v, normalised units, on
    the finest level's grid; ``losses``: the final loss per level; ``steps``: Adam steps per level."""

    ddf: torch.Tensor
    velocity: torch.Tensor
    losses: list[float]
    steps: list[int]
    seconds: float


@dataclass
class InstanceOptimisation:
    """Fit a diffeomorphic transform to a pair, coarse to fine (see the module docstring).

    Args:
        similarity: ``loss(warped, fixed) -> scalar`` (B, C, *S), evaluated at every level on the level's images,
            smallest for a perfect match (e.g. :class:`deepsim.losses.LocalNCCLoss`).
        transform: ``"svf"``: φ = exp(v), v optimised by Adam through scaling and squaring; ``"greedy"``: φ is
            updated by composition with a small smoothed step each iteration, φ ← φ ∘ (id + δ), the step δ an
            Adam-normalised, Gaussian-smoothed gradient no longer than ``learning_rate`` voxels anywhere (the
            greedy scheme of ANTs SyN and FireANTs; each step is invertible, so is their composition). Greedy
            steps cost one warp instead of a whole integration: several times cheaper.
        scales: pyramid shrink factors, coarse to fine (1 = the input grid).
        iterations: the most steps per level. The default's 15 steps at full resolution (rather than 20) gave
            0.001 less Dice for a fifth less time on the 2 mm brains (benchmarks/results/instance_optimisation_cpu.md).
        learning_rate: step size in voxels of each level (Adam's for ``svf``, the longest step for ``greedy``).
        smooth_gradient: σ (voxels of each level) of the Gaussian applied to the gradient before each step.
        smooth_field: σ (voxels) of a Gaussian applied to the velocity (``svf``) or the displacement (``greedy``)
            after each step (0: none).
        regularization_weight: weight of a diffusion penalty on the velocity (``svf`` only; level voxels).
        integration_steps: scaling-and-squaring steps (``svf``).
        velocity_shrink: ``svf``: the finest level's velocity grid is this much coarser than the images (2 cuts the
            cost of integration 8-fold in 3D); its displacement is upsampled linearly before warping.
        tolerance, patience: plateau stop of a level: no improvement by ``tolerance`` times the best loss so far
            for ``patience`` steps.
        step_eps: ``greedy``: the ε of the Adam normalisation, as a fraction of the root mean square gradient at
            the first step of the first level (per voxel, of the summed loss): voxels whose gradient is far below it
            take proportionally smaller steps instead of full ones (plain Adam moves every voxel by a full step
            however weak its evidence, which roughens the field where the images are nearly flat).
        loss_name: what ``similarity`` is called, for reports.
    """

    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.Module
    transform: str = "greedy"
    scales: Sequence[int] = (4, 2, 1)
    iterations: Sequence[int] = (50, 30, 15)
    learning_rate: float = 0.5
    smooth_gradient: float = 1.0
    smooth_field: float = 0.75
    regularization_weight: float = 0.0
    integration_steps: int = 6
    velocity_shrink: int = 1
    tolerance: float = 2e-4
    patience: int = 10
    step_eps: float = 3.0
    loss_name: str = ""

    def __post_init__(self) -> None:
        if self.transform not in ("svf", "greedy"):
            raise ValueError(f"transform must be 'svf' or 'greedy', got {self.transform!r}")
        if len(self.scales) != len(self.iterations) or not self.scales:
            raise ValueError(f"scales {tuple(self.scales)} and iterations {tuple(self.iterations)} must be non-empty "
                             "and of the same length")
        if any(s < 1 for s in self.scales) or any(i < 0 for i in self.iterations):
            raise ValueError("scales must be >= 1 and iterations >= 0")
        if not self.learning_rate > 0 or self.integration_steps < 0 or self.velocity_shrink < 1:
            raise ValueError("learning_rate must be > 0, integration_steps >= 0 and velocity_shrink >= 1")

    def displacement(self, velocity: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """exp(velocity) (normalised), linearly resized to ``shape`` if the velocity grid is coarser."""
        return _resize_field(integrate_velocity(velocity, self.integration_steps), shape)

    @torch.enable_grad()  # also when called under no_grad (evaluation): the steps need gradients
    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, init_ddf: torch.Tensor | None = None,
                 progress: bool = False) -> InstanceResult:
        """moving, fixed: (B, C, *S) on one grid and device; init_ddf: (B, ndim, *S) voxels or None."""
        started = time.perf_counter()
        if moving.shape != fixed.shape or moving.ndim not in (4, 5):
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be (B, C, *S), "
                             "2D or 3D, of the same shape")
        shape = tuple(fixed.shape[2:])
        moving, fixed = moving.float(), fixed.float()
        field = None if init_ddf is None else ddf_to_normalised(init_ddf.detach().float())
        losses, steps, eps = [], [], None
        for scale, iters in zip(self.scales, self.iterations):
            image_shape = level_shape(shape, scale)
            f_level, m_level = downsample(fixed, image_shape), downsample(moving, image_shape)
            bar = tqdm(range(int(iters)), desc=f"instance optimisation 1/{scale}", disable=not progress, leave=False)
            if self.transform == "svf":
                shrink = self.velocity_shrink if scale == self.scales[-1] else 1
                field, value, taken = self._svf_level(field, m_level, f_level, level_shape(shape, scale * shrink), bar)
            else:
                field, value, taken, eps = self._greedy_level(field, m_level, f_level, bar, eps)
            losses.append(value)
            steps.append(taken)
        with torch.no_grad():
            if field is None:
                field = torch.zeros(fixed.shape[0], len(shape), *shape, device=fixed.device)
            u = self.displacement(field, shape) if self.transform == "svf" else _resize_field(field, shape)
        return InstanceResult(normalised_to_ddf(u), field, losses, steps, time.perf_counter() - started)

    def _svf_level(self, velocity, m_level, f_level, field_shape, bar) -> tuple[torch.Tensor, float, int]:
        """Adam on the velocity (in voxels of this level, so the step is in voxels) through scaling and squaring."""
        ndim = f_level.ndim - 2
        if velocity is None:
            velocity = torch.zeros(f_level.shape[0], ndim, *field_shape, device=f_level.device)
        to_voxels = normalised_to_ddf(torch.ones(1, ndim, *field_shape, device=f_level.device))
        param = (_resize_field(velocity, field_shape) * to_voxels).requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=self.learning_rate)
        plateau, taken, value = Plateau(self.tolerance, self.patience, relative=True), 0, math.nan
        for _ in bar:
            optimiser.zero_grad(set_to_none=True)
            u = self.displacement(param / to_voxels, f_level.shape[2:])
            loss = self.similarity(sample(m_level, u, "zeros"), f_level)
            if self.regularization_weight:
                loss = loss + self.regularization_weight * _diffusion(param)
            loss.backward()
            if self.smooth_gradient > 0:
                param.grad = gaussian_smooth(param.grad, self.smooth_gradient)
            optimiser.step()
            if self.smooth_field > 0:
                with torch.no_grad():
                    param.copy_(gaussian_smooth(param, self.smooth_field))
            taken, value = taken + 1, float(loss.detach())
            if plateau(value):
                break
        return param.detach() / to_voxels, value, taken

    def _greedy_level(self, u, m_level, f_level, bar, eps: float | None) -> tuple[torch.Tensor, float, int, float]:
        """φ ← φ ∘ (id + δ) with δ the smoothed, Adam-normalised gradient, at most ``learning_rate`` voxels long.
        ``eps``: the normalisation's ε, None at the first level (set from its first gradient, then returned)."""
        ndim = f_level.ndim - 2
        shape = f_level.shape[2:]
        u = torch.zeros(f_level.shape[0], ndim, *shape, device=f_level.device) if u is None else _resize_field(u, shape)
        to_norm = ddf_to_normalised(torch.ones(1, ndim, *shape, device=f_level.device))
        first, second = torch.zeros_like(u), torch.zeros_like(u)
        beta1, beta2 = 0.9, 0.99
        plateau, taken, value = Plateau(self.tolerance, self.patience, relative=True), 0, math.nan
        for step in bar:
            u = u.detach().requires_grad_(True)
            loss = self.similarity(sample(m_level, u, "zeros"), f_level)
            (grad,) = torch.autograd.grad(loss, u)
            with torch.no_grad():
                # per voxel, the gradient of the loss summed over voxels with respect to that voxel's displacement in
                # level voxels: a size that does not shrink with the voxel count of finer levels
                grad = grad * (grad[0, 0].numel() / to_norm)
                if self.smooth_gradient > 0:
                    grad = gaussian_smooth(grad, self.smooth_gradient)
                if eps is None:  # relative to the very first gradient: the same for every loss and image
                    eps = self.step_eps * float(grad.square().mean().sqrt()) + 1e-12
                first.mul_(beta1).add_(grad, alpha=1 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                direction = (first / (1 - beta1 ** (step + 1))) / ((second / (1 - beta2 ** (step + 1))).sqrt() + eps)
                # (sum of squares, max, then one sqrt: linalg.vector_norm over dim 1 is 40x slower on the CPU)
                longest = direction.square().sum(dim=1, keepdim=True).amax(dim=tuple(range(2, ndim + 2)),
                                                                          keepdim=True).sqrt()
                delta = direction * (-self.learning_rate / longest.clamp_min(1.0)) * to_norm
                u = delta + sample(u.detach(), delta)  # (id + u) ∘ (id + δ)
                if self.smooth_field > 0:
                    u = gaussian_smooth(u, self.smooth_field)
            taken, value = taken + 1, float(loss.detach())
            if plateau(value):
                break
        return u.detach(), value, taken, eps
