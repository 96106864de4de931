"""The symmetric (mid-space) transform model of the instance optimisation: SyN's scheme with greedy steps.

Two maps from a middle space, φ_m to the moving image and φ_f to the fixed image, are fitted together: the loss
compares ``m ∘ φ_m`` with ``f ∘ φ_f`` (both images move, neither is the reference), and each step updates both
half-maps by composition with their own smoothed, Adam-normalised steps (:class:`~.instance.GreedyStep`), as
ANTs' SyN and FireANTs' ``SyNRegistration`` do. At the end, on the full grid, the whole transform and its inverse
are composed from the half-maps and their inverses (Newton inversion of each half, which moves only about
half the distance and inverts accurately):

    φ   = φ_m ∘ φ_f⁻¹      (fixed → moving: the moving image is read at φ(x))
    φ⁻¹ = φ_f ∘ φ_m⁻¹      (moving → fixed)

The mid space is the fixed image's grid (the working grid); a network's start ``u₀`` is put on the moving side
(φ_m = id + u₀, φ_f = id). Fields are in grid_sample's normalised units (:mod:`.fields`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepsim.registration.fields import compose, invert_displacement, resize_field, sample

__all__ = ["SymmetricFields"]


@dataclass(frozen=True)
class SymmetricFields:
    """``moving_half``, ``fixed_half``: displacements (B, ndim, *S) of φ_m and φ_f on one grid, normalised."""

    moving_half: torch.Tensor
    fixed_half: torch.Tensor

    @classmethod
    def start(cls, init: torch.Tensor | None, batch: int, shape: Sequence[int], device: torch.device
              ) -> SymmetricFields:
        """φ_m = id + ``init`` (or the identity), φ_f = id, on ``shape``."""
        zeros = torch.zeros(batch, len(shape), *shape, device=device)
        return cls(zeros.clone() if init is None else init, zeros)

    def level(self, moving: torch.Tensor, fixed: torch.Tensor,
              similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steppers: Sequence,
              plateau: Callable[[float], bool], steps) -> tuple[SymmetricFields, float, int]:
        """One pyramid level: for each of ``steps`` (an iterable, e.g. a progress bar) one greedy step of both halves
        on ``similarity(moving ∘ φ_m, fixed ∘ φ_f)`` until ``plateau`` says stop. moving, fixed: (B, C, *S) of the
        level; ``steppers``: the two halves' :class:`~.instance.GreedyStep`. Returns the new fields, the last loss
        and the steps taken."""
        shape = fixed.shape[2:]
        u_m, u_f = resize_field(self.moving_half, shape), resize_field(self.fixed_half, shape)
        for stepper, u in zip(steppers, (u_m, u_f)):
            stepper.start_level(u)
        taken, value = 0, math.nan
        for _ in steps:
            u_m, u_f = u_m.detach().requires_grad_(True), u_f.detach().requires_grad_(True)
            loss = similarity(sample(moving, u_m, "zeros"), sample(fixed, u_f, "zeros"))
            try:
                grad_m, grad_f = torch.autograd.grad(loss, (u_m, u_f))
            except RuntimeError as exc:  # a loss that holds its second image constant (DeepSim's cached features)
                raise ValueError(f"the symmetric transform needs a similarity differentiable in both images; "
                                 f"{type(similarity).__name__} is not ({exc})") from exc
            u_m, u_f = steppers[0](u_m, grad_m), steppers[1](u_f, grad_f)
            taken, value = taken + 1, float(loss.detach())
            if plateau(value):
                break
        return SymmetricFields(u_m.detach(), u_f.detach()), value, taken

    def transforms(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(φ_m ∘ φ_f⁻¹, φ_f ∘ φ_m⁻¹) as displacements (B, ndim, *shape), normalised."""
        u_m, u_f = resize_field(self.moving_half, shape), resize_field(self.fixed_half, shape)
        return compose(u_m, invert_displacement(u_f)), compose(u_f, invert_displacement(u_m))

    def stacked(self) -> torch.Tensor:
        """Both halves along the channels: (B, 2 ndim, *S), φ_m's first."""
        return torch.cat([self.moving_half, self.fixed_half], dim=1)
