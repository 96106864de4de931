"""Test-time instance optimisation: a diffeomorphic transform fitted to one pair (or a batch) on a pyramid.

What the accurate classical tools do (ANTs SyN, FireANTs), written for our fields. The transform is fitted coarse
to fine (default shrink 4, 2, 1; images blurred with σ = shrink / 2 voxels) to minimise ``similarity(m ∘ φ, f)``;
the gradient is smoothed with a Gaussian before each step (SyN's "update field" smoothing, which keeps the
updates fluid-like), and a level ends when the loss has not improved by ``tolerance`` for ``patience`` steps (a
plateau) or after its iteration budget. Three transform models (:data:`TRANSFORMS`):

- ``"greedy"`` (default): φ is updated by composition, φ ← φ ∘ (id + δ), with δ the smoothed, Adam-normalised
  gradient step, at most ``learning_rate`` voxels long, and the displacement smoothed a little after each step
  (the scheme of ANTs' greedy SyN and FireANTs). Every step is a small smooth displacement, hence invertible, and
  so is their composition: no folding, and one warp per step.
- ``"symmetric"``: SyN's mid-space scheme (:mod:`.symmetric`): both images move half-way, ``m ∘ φ_m`` against
  ``f ∘ φ_f``, both half-maps updated by the same greedy steps from one loss; the whole transform is
  φ = φ_m ∘ φ_f⁻¹ and its inverse φ_f ∘ φ_m⁻¹. Neither image is favoured; twice the warps of a greedy step.
- ``"svf"``: φ = exp(v), the flow of a stationary velocity field integrated by scaling and squaring, v fitted by
  Adam (optionally on a coarser grid than the images at the finest level). Diffeomorphic for any smooth v, but
  each step back-propagates through the whole integration: several times the cost of a greedy step.

Every model gives the inverse transform (:meth:`InstanceResult.inverse`; symmetric: composed from the inverted
half-maps, which the forward transform needs anyway; svf: exp(−v); greedy: the field inverted by Newton's method,
:func:`~deepsim.registration.fields.invert_displacement`, only when asked for: measured 0.7 s at 80×96×80 on two
CPU cores, where a 2 mm pair registers in ~2 s, and evaluation and ``deepsim compare`` never use it). The start is a network's predicted displacement ``u₀`` (greedy: φ₀ = id + u₀; symmetric: φ_m = id + u₀,
φ_f = id; svf: v₀ = u₀, since exp(u₀) ≈ id + u₀ for smooth, moderate fields), or the identity. Fields inside are
in grid_sample's normalised units (:mod:`deepsim.registration.fields`), so a level change needs no rescaling; what
goes in and comes out is a displacement in voxels of the full grid (:mod:`deepsim.spatial`'s convention).
Everything runs on the inputs' device.
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
from deepsim.registration.fields import (ddf_to_normalised, integrate_velocity, invert_displacement,
                                         normalised_to_ddf, resize_field, sample)
from deepsim.registration.plateau import Plateau

__all__ = ["InstanceOptimisation", "InstanceResult", "GreedyStep", "instance_similarity", "test_time_loss",
           "LABEL_LOSSES", "integrate_velocity", "ddf_to_normalised", "normalised_to_ddf", "default_transform",
           "check_transform", "TEST_TIME_SETTINGS", "TRANSFORMS", "DEFAULT_TRANSFORM"]

#: the transform models (module docstring)
TRANSFORMS = ("greedy", "symmetric", "svf")
#: the model used when none is named (:func:`default_transform`)
DEFAULT_TRANSFORM = "greedy"


def default_transform(similarity) -> str:
    """:data:`DEFAULT_TRANSFORM`, except ``greedy`` for a similarity that holds the fixed image constant (the
    DeepSim losses compute its features once, without gradient), which the symmetric model cannot use."""
    from deepsim.losses.deepsim import DeepSimLoss

    return "greedy" if DEFAULT_TRANSFORM == "symmetric" and isinstance(similarity, DeepSimLoss) else DEFAULT_TRANSFORM


def check_transform(transform: str | None, loss: str) -> None:
    """ValueError (one line, naming the option) unless the transform model ``transform`` (None: the default) can
    run with the test-time loss called ``loss``: the symmetric model moves the fixed image too, which the DeepSim
    losses cannot follow (they hold the fixed image's features constant)."""
    from deepsim.losses import FEATURE_NET_OF

    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"--transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
    if transform == "symmetric" and FEATURE_NET_OF.get(loss):
        raise ValueError(f"--transform symmetric cannot use the loss {loss}: it holds the fixed image's features "
                         "constant; use --transform greedy (its default) or another loss")


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


def _diffusion(v: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of ``v`` (B, ndim, *S) along every axis (in its own units)."""
    return sum(torch.diff(v, dim=2 + axis).pow(2).mean() for axis in range(v.ndim - 2))


@dataclass(frozen=True)
class InstanceResult:
    """``ddf``: (B, ndim, *S) voxel displacement of the fitted transform φ on the full grid (the moving image is
    read at x + ddf(x)); ``inverse_ddf``: the same for φ⁻¹ (a point y of the moving side goes to y + inverse_ddf(y)
    on the fixed side), or None where it is computed only when asked for (greedy: :meth:`inverse`); ``field``: what was optimised on the finest level's grid, normalised units (greedy: φ's
    displacement, svf: the velocity v, symmetric: φ_m's and φ_f's displacements stacked along the channels);
    ``losses``: the final loss per level; ``steps``: steps taken per level."""

    ddf: torch.Tensor
    inverse_ddf: torch.Tensor | None
    field: torch.Tensor
    losses: list[float]
    steps: list[int]
    seconds: float

    def inverse(self) -> torch.Tensor:
        """(B, ndim, *S) voxels: ``inverse_ddf``, or ``ddf`` inverted now by Newton's method (not kept)."""
        if self.inverse_ddf is not None:
            return self.inverse_ddf
        return normalised_to_ddf(invert_displacement(ddf_to_normalised(self.ddf)))


class GreedyStep:
    """The compositive update of one field: u ← (id + u) ∘ (id + δ) − id, then smoothed (σ ``smooth_field``).

    δ is the gradient of the loss with respect to u (per voxel, of the loss summed over voxels, in voxels of the
    level), smoothed with σ ``smooth_gradient``, normalised by Adam's moments with ε = ``step_eps`` × the root mean
    square of the first gradient ever seen (then kept for later levels: ``eps``), and scaled so that its longest
    vector is ``learning_rate`` voxels (never longer). Moments restart at each level (:meth:`start_level`).
    """

    beta1, beta2 = 0.9, 0.99

    def __init__(self, learning_rate: float, smooth_gradient: float, smooth_field: float, step_eps: float):
        self.learning_rate, self.smooth_gradient = learning_rate, smooth_gradient
        self.smooth_field, self.step_eps = smooth_field, step_eps
        self.eps: float | None = None
        self.first = self.second = None
        self.count = 0

    def start_level(self, u: torch.Tensor) -> None:
        self.first, self.second, self.count = torch.zeros_like(u), torch.zeros_like(u), 0

    @torch.no_grad()
    def __call__(self, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """u, grad: (B, ndim, *S) normalised units (grad: of the loss with respect to u) -> the updated u."""
        ndim = u.ndim - 2
        to_norm = ddf_to_normalised(torch.ones(1, ndim, *u.shape[2:], device=u.device, dtype=u.dtype))
        # a size that does not shrink with the voxel count of finer levels
        grad = grad * (grad[0, 0].numel() / to_norm)
        if self.smooth_gradient > 0:
            grad = gaussian_smooth(grad, self.smooth_gradient)
        if self.eps is None:  # relative to the very first gradient: the same for every loss and image
            self.eps = self.step_eps * float(grad.square().mean().sqrt()) + 1e-12
        self.count += 1
        self.first.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        self.second.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        direction = ((self.first / (1 - self.beta1 ** self.count))
                     / ((self.second / (1 - self.beta2 ** self.count)).sqrt() + self.eps))
        # (sum of squares, max, then one sqrt: linalg.vector_norm over dim 1 is 40x slower on the CPU)
        longest = direction.square().sum(dim=1, keepdim=True).amax(dim=tuple(range(2, ndim + 2)), keepdim=True).sqrt()
        delta = direction * (-self.learning_rate / longest.clamp_min(1.0)) * to_norm
        u = delta + sample(u.detach(), delta)  # (id + u) ∘ (id + δ)
        return gaussian_smooth(u, self.smooth_field) if self.smooth_field > 0 else u


@dataclass
class InstanceOptimisation:
    """Fit a diffeomorphic transform to a pair, coarse to fine (see the module docstring).

    Args:
        similarity: ``loss(warped, fixed) -> scalar`` (B, C, *S), evaluated at every level on the level's images,
            smallest for a perfect match (e.g. :class:`deepsim.losses.LocalNCCLoss`).
        transform: None: :func:`default_transform`; ``"greedy"``: φ is updated by composition with a small
            smoothed step each iteration, φ ← φ ∘ (id + δ) (:class:`GreedyStep`; the greedy scheme of ANTs SyN
            and FireANTs; each step is invertible, so is their composition); ``"symmetric"``: both images move
            towards a middle space, two half-maps updated by the same steps (:mod:`.symmetric`; needs a similarity
            differentiable in both images, so not the DeepSim losses, which hold the fixed image's features
            constant; :func:`check_transform`); ``"svf"``:
            φ = exp(v), v optimised by Adam through scaling and squaring (several times the cost of a greedy step).
        scales: pyramid shrink factors, coarse to fine (1 = the input grid).
        iterations: the most steps per level. The default's 15 steps at full resolution (rather than 20) gave
            0.001 less Dice for a fifth less time on the 2 mm brains (benchmarks/results/instance_optimisation_cpu.md).
        learning_rate: step size in voxels of each level (Adam's for ``svf``, the longest step of each greedy
            update otherwise).
        smooth_gradient: σ (voxels of each level) of the Gaussian applied to the gradient before each step.
        smooth_field: σ (voxels) of a Gaussian applied to the velocity (``svf``) or the displacement(s) after each
            step (0: none).
        regularization_weight: weight of a diffusion penalty on the velocity (``svf`` only; level voxels).
        integration_steps: scaling-and-squaring steps (``svf``).
        velocity_shrink: ``svf``: the finest level's velocity grid is this much coarser than the images (2 cuts the
            cost of integration 8-fold in 3D); its displacement is upsampled linearly before warping.
        tolerance, patience: plateau stop of a level: no improvement by ``tolerance`` times the best loss so far
            for ``patience`` steps.
        step_eps: ``greedy``/``symmetric``: the ε of the Adam normalisation, as a fraction of the root mean square
            gradient at the first step of the first level (per voxel, of the summed loss): voxels whose gradient is
            far below it take proportionally smaller steps instead of full ones (plain Adam moves every voxel by a
            full step however weak its evidence, which roughens the field where the images are nearly flat).
        loss_name: what ``similarity`` is called, for reports.
    """

    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.Module
    transform: str | None = None
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
        if self.transform is None:
            self.transform = default_transform(self.similarity)
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}; got {self.transform!r}")
        if len(self.scales) != len(self.iterations) or not self.scales:
            raise ValueError(f"scales {tuple(self.scales)} and iterations {tuple(self.iterations)} must be non-empty "
                             "and of the same length")
        if any(s < 1 for s in self.scales) or any(i < 0 for i in self.iterations):
            raise ValueError("scales must be >= 1 and iterations >= 0")
        if not self.learning_rate > 0 or self.integration_steps < 0 or self.velocity_shrink < 1:
            raise ValueError("learning_rate must be > 0, integration_steps >= 0 and velocity_shrink >= 1")

    def displacement(self, velocity: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """exp(velocity) (normalised), linearly resized to ``shape`` if the velocity grid is coarser."""
        return resize_field(integrate_velocity(velocity, self.integration_steps), shape)

    @torch.enable_grad()  # also when called under no_grad (evaluation): the steps need gradients
    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, init_ddf: torch.Tensor | None = None,
                 progress: bool = False) -> InstanceResult:
        """moving, fixed: (B, C, *S) on one grid and device; init_ddf: (B, ndim, *S) voxels or None."""
        from deepsim.registration.symmetric import SymmetricFields

        started = time.perf_counter()
        if moving.shape != fixed.shape or moving.ndim not in (4, 5):
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be (B, C, *S), "
                             "2D or 3D, of the same shape")
        shape = tuple(fixed.shape[2:])
        moving, fixed = moving.float(), fixed.float()
        field = None if init_ddf is None else ddf_to_normalised(init_ddf.detach().float())
        if self.transform == "symmetric":
            field = SymmetricFields.start(field, fixed.shape[0], shape, fixed.device)
        steppers = [self._stepper() for _ in range(2 if self.transform == "symmetric" else 1)]
        losses, steps = [], []
        for scale, iters in zip(self.scales, self.iterations):
            image_shape = level_shape(shape, scale)
            f_level, m_level = downsample(fixed, image_shape), downsample(moving, image_shape)
            bar = tqdm(range(int(iters)), desc=f"instance optimisation 1/{scale}", disable=not progress, leave=False)
            if self.transform == "svf":
                shrink = self.velocity_shrink if scale == self.scales[-1] else 1
                field, value, taken = self._svf_level(field, m_level, f_level, level_shape(shape, scale * shrink), bar)
            elif self.transform == "symmetric":
                field, value, taken = field.level(m_level, f_level, self.similarity, steppers, self._plateau(), bar)
            else:
                field, value, taken = self._greedy_level(field, m_level, f_level, steppers[0], bar)
            losses.append(value)
            steps.append(taken)
        with torch.no_grad():
            if self.transform == "symmetric":
                u, inverse = field.transforms(shape)
                field = field.stacked()
            elif field is None:
                field = torch.zeros(fixed.shape[0], len(shape), *shape, device=fixed.device)
                u = inverse = field
            elif self.transform == "svf":
                u, inverse = self.displacement(field, shape), self.displacement(-field, shape)
            else:
                u, inverse = resize_field(field, shape), None  # inverted when asked for (InstanceResult.inverse)
        return InstanceResult(normalised_to_ddf(u), None if inverse is None else normalised_to_ddf(inverse), field,
                              losses, steps, time.perf_counter() - started)

    def _stepper(self) -> GreedyStep:
        return GreedyStep(self.learning_rate, self.smooth_gradient, self.smooth_field, self.step_eps)

    def _plateau(self) -> Plateau:
        return Plateau(self.tolerance, self.patience, relative=True)

    def _svf_level(self, velocity, m_level, f_level, field_shape, bar) -> tuple[torch.Tensor, float, int]:
        """Adam on the velocity (in voxels of this level, so the step is in voxels) through scaling and squaring."""
        ndim = f_level.ndim - 2
        if velocity is None:
            velocity = torch.zeros(f_level.shape[0], ndim, *field_shape, device=f_level.device)
        to_voxels = normalised_to_ddf(torch.ones(1, ndim, *field_shape, device=f_level.device))
        param = (resize_field(velocity, field_shape) * to_voxels).requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=self.learning_rate)
        plateau, taken, value = self._plateau(), 0, math.nan
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

    def _greedy_level(self, u, m_level, f_level, stepper: GreedyStep, bar) -> tuple[torch.Tensor, float, int]:
        """φ ← φ ∘ (id + δ) each step (:class:`GreedyStep`) until the level's plateau or budget."""
        shape = f_level.shape[2:]
        u = torch.zeros(f_level.shape[0], f_level.ndim - 2, *shape, device=f_level.device) if u is None else \
            resize_field(u, shape)
        stepper.start_level(u)
        plateau, taken, value = self._plateau(), 0, math.nan
        for _ in bar:
            u = u.detach().requires_grad_(True)
            loss = self.similarity(sample(m_level, u, "zeros"), f_level)
            (grad,) = torch.autograd.grad(loss, u)
            u = stepper(u, grad)
            taken, value = taken + 1, float(loss.detach())
            if plateau(value):
                break
        return u.detach(), value, taken
