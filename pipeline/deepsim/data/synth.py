"""Label-driven synthetic training pairs on the training device, SynthMorph-style (DESIGN §8.4, §9).

Per pair: two label maps (two different maps of a :class:`~deepsim.data.label_bank.LabelBank`, or one random
"shapes" map used twice, :mod:`deepsim.data.shapes`), each deformed on its own by a random diffeomorphism — a
stationary velocity field of Gaussian noise drawn at 1/16 resolution, resized linearly (the smoothing), integrated
by scaling and squaring — composed with a small random affine; labels are resampled nearest (or by the argmax of
the linearly warped one-hot maps). An image is then synthesised from each warped map: per-label Gaussian
intensities (mean U(25, 225)/255, std U(5, 25)/255, the background 0 with p 0.2), Gaussian blur (σ ≤ 1 voxel per
axis), a smooth multiplicative bias exp(noise at 1/40 resolution, std ≤ 0.3), min-max to [0, 1], gamma
``x ** exp(N(0, 0.25²))``, optionally a thick-slice resolution loss along one axis, additive noise, clamp to
[0, 1]. Moving and fixed get independent contrasts (``same_contrast=True``: one contrast per pair). Optional flips
act on the whole pair. Every label map is warped by pull-back: ``out(x) = in(A (x + u(x)))`` in voxels about the
grid centre.

Randomness is drawn apart from its use (STYLE §15): :meth:`LabelPairSynth.sample` turns a ``torch.Generator``
into a :class:`PairParams` record of small tensors (full-resolution noise enters as per-image seeds), and
:meth:`LabelPairSynth.apply` is a deterministic function of it. Everything runs on the bank's device.

Usage (the bank file is made once, on the CPU: ``python -m deepsim.workflows.label_bank --spacing 1 --out bank_1mm.npz``,
``--fsaverage`` to add FreeSurfer's fsaverage; about 1 MB)::

    bank = LabelBank.load("bank_1mm.npz", device="cuda")
    synth = LabelPairSynth(bank, shapes_probability=0.1)
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch = synth(4, generator)  # or: params = synth.sample(4, generator); batch = synth.apply(params)
    batch["moving"], batch["fixed"]              # (4, 1, 160, 192, 160) float32 in [0, 1]
    batch["moving_label"], batch["fixed_label"]  # (4, 1, 160, 192, 160) long, classes 0 .. bank.num_classes - 1
    dataclasses.asdict(synth.options)            # every range, for the run's parameters

Default deformation strength: velocity noise std up to 6 voxels on a grid 16 times coarser (the default of
SynthMorph's first training script, voxelmorph's ``--vel-std 6``). Measured on the 1 mm bank (8 warps,
``python benchmarks/synth_speed.py --bank bank_1mm.npz --device cpu --cases --field-pairs 4``): in the brain,
mean displacement 3.2 voxels, max 13.3, std log det J 0.33, no folding (twice the strength: 0.0002 % folded);
with the default affine as well (rotations ≤ 10° per axis, scale ±8 %, shifts ≤ 4 voxels), mean 11.0 voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch.nn import functional as F

from deepsim.data.label_bank import LabelBank
from deepsim.data.random_fields import (
    affine_matrices,
    apply_affine_normalised,
    blur_per_item,
    coarse_shape,
    integrate_velocity,
    normalised_grid,
    positions_to_displacement,
    resize,
    sample,
    voxels_to_normalised,
)
from deepsim.data.shapes import shapes_label_map

__all__ = ["PairParams", "SynthOptions", "LabelPairSynth"]

_SHAPES = -1  # source index of a shapes map
_CLASS_CHUNK = 16  # classes warped together by label_interpolation="linear"


@dataclass(frozen=True)
class PairParams:
    """Everything random about a batch of B pairs; axis 1 of (B, 2, ...) is (moving, fixed). Units: voxels of the
    bank grid for geometry, [0, 1] intensities."""

    sources: torch.Tensor  # (B, 2) long: bank map index, or -1: both sides warp one shapes map
    shapes_noise: tuple[torch.Tensor, ...]  # per scale (B, J, *coarse)
    shapes_velocity: torch.Tensor  # (B, ndim, *velocity grid) voxels
    velocity: torch.Tensor  # (B, 2, ndim, *velocity grid) voxels
    affine: torch.Tensor  # (B, 2, ndim, ndim + 1) voxels about the grid centre
    means: torch.Tensor  # (B, 2, K) per-class mean intensity
    stds: torch.Tensor  # (B, 2, K) per-class std
    blur: torch.Tensor  # (B, 2, ndim) Gaussian σ, voxels
    log_bias: torch.Tensor  # (B, 2, 1, *bias grid)
    log_gamma: torch.Tensor  # (B, 2)
    thick_axis: torch.Tensor  # (B, 2) long
    thick_factor: torch.Tensor  # (B, 2) slice thickness in voxels; 1 = none
    noise_std: torch.Tensor  # (B, 2)
    flips: torch.Tensor  # (B, ndim) bool
    seeds: torch.Tensor  # (B, 2) long: seeds of the full-resolution noise of each image

    @property
    def batch_size(self) -> int:
        return int(self.sources.shape[0])

    def to(self, device: torch.device | str) -> "PairParams":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) for k, v in moved.items()}
        return PairParams(**moved)


@dataclass(frozen=True)
class SynthOptions:
    """The generator's ranges (defaults: SynthMorph's, DESIGN §9). Geometry in voxels of the bank grid.

    Args:
        shapes_probability: chance that a pair is made from one random shapes map instead of two bank maps.
        shapes_classes: labels J of a shapes map (≤ K); shapes_scales: noise grid spacings in voxels.
        shapes_warp_std: std of the shapes map's own velocity noise, voxels.
        velocity_std: each image's velocity noise has std U(0, velocity_std) voxels, drawn on a grid
            ``velocity_resolution`` (16) times coarser; integrated in ``integration_steps`` on a grid
            ``integration_shrink`` times coarser than the bank's (1: full resolution).
        max_rotation_deg, max_scale, max_shear, max_shift: the affine's ranges: U(±deg) per axis, scale
            exp(U(log(1 ∓ max_scale))) per axis, shear U(±) per off-diagonal term, shift U(±voxels) per axis.
        label_interpolation: "nearest" or "linear" (argmax of the linearly warped one-hot maps; K× the cost).
        mean_range, std_range: per-class intensity mean and within-class std, drawn uniformly.
        zero_background_probability: chance that class 0 of an image is 0 (no texture).
        blur_max: Gaussian σ per axis U(0, blur_max) voxels.
        bias_std: log bias field noise std U(0, bias_std), on a grid ``bias_resolution`` (40) times coarser.
        gamma_std: std of log(gamma).
        thick_slice_probability, max_slice_thickness: chance of a resolution loss along one random axis, whose
            slices are U(1, max) voxels thick (averaged, then resized back linearly).
        noise_std: additive Gaussian noise std U(0, noise_std).
        flip_axes, flip_probability: each listed axis flips both images and labels of a pair with this chance.
        same_contrast: the fixed image takes the moving image's class means, stds and gamma.
    """

    shapes_probability: float = 0.0
    shapes_classes: int = 26
    shapes_scales: tuple[float, ...] = (32.0, 16.0)
    shapes_warp_std: float = 8.0
    velocity_std: float = 6.0
    velocity_resolution: float = 16.0
    integration_steps: int = 5
    integration_shrink: int = 2
    max_rotation_deg: float = 10.0
    max_scale: float = 0.08
    max_shear: float = 0.0
    max_shift: float = 4.0
    label_interpolation: str = "nearest"
    mean_range: tuple[float, float] = (25 / 255, 225 / 255)
    std_range: tuple[float, float] = (5 / 255, 25 / 255)
    zero_background_probability: float = 0.2
    blur_max: float = 1.0
    bias_std: float = 0.3
    bias_resolution: float = 40.0
    gamma_std: float = 0.25
    thick_slice_probability: float = 0.0
    max_slice_thickness: float = 4.0
    noise_std: float = 0.02
    flip_axes: tuple[int, ...] = (0,)
    flip_probability: float = 0.5
    same_contrast: bool = False

    def __post_init__(self) -> None:
        for name in ("shapes_probability", "zero_background_probability", "thick_slice_probability",
                     "flip_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.label_interpolation not in ("nearest", "linear"):
            raise ValueError(f"label_interpolation must be 'nearest' or 'linear', got {self.label_interpolation!r}")
        if self.integration_steps < 0 or self.integration_shrink < 1 or self.max_slice_thickness < 1:
            raise ValueError("need integration_steps >= 0, integration_shrink >= 1, max_slice_thickness >= 1")
        if not (0 < self.mean_range[0] <= self.mean_range[1] and 0 <= self.std_range[0] <= self.std_range[1]):
            raise ValueError(f"bad intensity ranges: mean_range {self.mean_range}, std_range {self.std_range}")
        object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
        object.__setattr__(self, "shapes_scales", tuple(float(s) for s in self.shapes_scales))


class LabelPairSynth:
    """Random (moving, fixed) image pairs with their label maps, synthesised from a label bank on its device.

    Args:
        bank: label maps (N, *S) of K classes; None for shapes only (then give ``shape`` and ``num_classes``).
        shape, num_classes, device: the grid, class count and device when ``bank`` is None.
        **options: :class:`SynthOptions` fields (``LabelPairSynth(bank, velocity_std=4.0)``); ``self.options``
            holds them all (``dataclasses.asdict`` for a run's parameters).
    """

    def __init__(self, bank: LabelBank | None, *, shape: Sequence[int] | None = None, num_classes: int | None = None,
                 device: torch.device | str | None = None, **options: object) -> None:
        if bank is None:
            if shape is None or num_classes is None:
                raise ValueError("without a bank give shape and num_classes (shapes-only generator)")
            options["shapes_probability"] = 1.0
            self.shape, self.num_classes = tuple(int(n) for n in shape), int(num_classes)
            self.device = torch.device(device or "cpu")
        else:
            self.shape, self.num_classes, self.device = bank.shape, bank.num_classes, bank.device
        self.bank, self.ndim = bank, len(self.shape)
        self.options = o = SynthOptions(**options)  # type: ignore[arg-type]
        if self.ndim not in (2, 3):
            raise ValueError(f"the grid must be 2D or 3D, got shape {self.shape}")
        if o.shapes_probability > 0 and not 2 <= o.shapes_classes <= self.num_classes:
            raise ValueError(f"shapes_classes must be in [2, {self.num_classes}] (the classes), got {o.shapes_classes}")
        if bank is not None and len(bank) == 0 and o.shapes_probability < 1:
            raise ValueError("the bank is empty: use shapes_probability=1")
        if any(a not in range(self.ndim) for a in o.flip_axes):
            raise ValueError(f"flip_axes must be spatial axes 0..{self.ndim - 1}, got {o.flip_axes}")
        self.velocity_shape = coarse_shape(self.shape, self.options.velocity_resolution)
        self.integration_shape = coarse_shape(self.shape, self.options.integration_shrink)
        self.bias_shape = coarse_shape(self.shape, self.options.bias_resolution)

    # ------------------------------------------------------------------ drawing
    def sample(self, batch_size: int, generator: torch.Generator) -> PairParams:
        """Draw the parameters of ``batch_size`` pairs from ``generator`` (on the bank's device)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator.device.type != self.device.type:
            raise ValueError(f"the generator is on {generator.device}, the bank on {self.device}")
        b, nd, k, dev, o = int(batch_size), self.ndim, self.num_classes, self.device, self.options

        def u(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
            return low + (high - low) * torch.rand(shape, generator=generator, device=dev)

        def n(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=dev)

        def per_item(values: torch.Tensor, like_ndim: int) -> torch.Tensor:  # (B, 2) → broadcastable
            return values.view(*values.shape, *[1] * like_ndim)

        count = len(self.bank) if self.bank is not None else 0
        first = (u(b) * count).long().clamp_max(max(count - 1, 0))
        second = (u(b) * max(count - 1, 1)).long().clamp_max(max(count - 2, 0))
        second = torch.where(second >= first, second + 1, second) if count >= 2 else first
        shapes = u(b) < o.shapes_probability
        sources = torch.where(shapes[:, None], torch.full((b, 2), _SHAPES, device=dev),
                              torch.stack([first, second], 1))
        j = o.shapes_classes
        shapes_noise = tuple(n(b, j, *coarse_shape(self.shape, s)) * u(b, j, *[1] * nd)
                             for s in o.shapes_scales)  # fmt: skip
        shapes_velocity = n(b, nd, *self.velocity_shape) * o.shapes_warp_std
        velocity = n(b, 2, nd, *self.velocity_shape) * per_item(u(b, 2, high=o.velocity_std), nd + 1)
        angles = u(b, 2, 1 if nd == 2 else 3, low=-1, high=1) * math.radians(o.max_rotation_deg)
        log_scales = u(b, 2, nd, low=math.log(1 - o.max_scale), high=math.log(1 + o.max_scale))
        shears = u(b, 2, nd * (nd - 1) // 2, low=-1, high=1) * o.max_shear
        shifts = u(b, 2, nd, low=-1, high=1) * o.max_shift
        affine = affine_matrices(angles.flatten(0, 1), log_scales.flatten(0, 1), shears.flatten(0, 1),
                                 shifts.flatten(0, 1)).view(b, 2, nd, nd + 1)
        means = u(b, 2, k, low=o.mean_range[0], high=o.mean_range[1])
        stds = u(b, 2, k, low=o.std_range[0], high=o.std_range[1])
        zero = u(b, 2) < o.zero_background_probability
        means[..., 0] = torch.where(zero, 0.0, means[..., 0])
        stds[..., 0] = torch.where(zero, 0.0, stds[..., 0])
        blur = u(b, 2, nd, high=o.blur_max)
        log_bias = n(b, 2, 1, *self.bias_shape) * per_item(u(b, 2, high=o.bias_std), nd + 1)
        log_gamma = n(b, 2) * o.gamma_std
        thick = u(b, 2) < o.thick_slice_probability
        thick_axis = (u(b, 2) * nd).long().clamp_max(nd - 1)
        thick_factor = torch.where(thick, u(b, 2, low=1.0, high=o.max_slice_thickness), 1.0)
        noise_std = u(b, 2, high=o.noise_std)
        allowed = torch.zeros(nd, dtype=torch.bool, device=dev)
        allowed[list(o.flip_axes)] = True
        flips = (u(b, nd) < o.flip_probability) & allowed
        seeds = torch.randint(0, 2**62, (b, 2), generator=generator, device=dev)
        if o.same_contrast:
            means[:, 1], stds[:, 1], log_gamma[:, 1] = means[:, 0], stds[:, 0], log_gamma[:, 0]
        return PairParams(sources, shapes_noise, shapes_velocity, velocity, affine, means, stds, blur, log_bias,
                          log_gamma, thick_axis, thick_factor, noise_std, flips, seeds)

    # ------------------------------------------------------------------ using
    def __call__(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``apply(sample(batch_size, generator))``."""
        return self.apply(self.sample(batch_size, generator))

    def apply(self, params: PairParams) -> dict[str, torch.Tensor]:
        """Pairs from ``params``: ``moving``/``fixed`` (B, 1, *S) float32 in [0, 1], ``moving_label``/``fixed_label``
        (B, 1, *S) long class indices 0..K-1."""
        b = params.batch_size
        base = self._base_maps(params)  # (2B, 1, *S) long: moving and fixed of pair i at 2i and 2i + 1
        positions = self.positions(params.velocity.flatten(0, 1), params.affine.flatten(0, 1))
        labels = self._warp_labels(base, positions)
        del positions
        images = self.synthesize(labels, params)
        shape = (b, 2, 1, *self.shape)
        images, labels = images.view(shape), labels.view(shape)
        images, labels = self._flip(images, params.flips), self._flip(labels, params.flips)
        return {"moving": images[:, 0].contiguous(), "fixed": images[:, 1].contiguous(),
                "moving_label": labels[:, 0].contiguous(), "fixed_label": labels[:, 1].contiguous()}

    def positions(self, velocity: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        """Where each output voxel reads its label map: ``A (x + exp(v)(x))``, normalised (B, ndim, *S).

        velocity: (B, ndim, *velocity grid) voxels; affine: (B, ndim, ndim + 1) voxels about the centre."""
        v = resize(voxels_to_normalised(velocity, self.shape), self.integration_shape)
        displacement = resize(integrate_velocity(v, self.options.integration_steps), self.shape)
        return apply_affine_normalised(affine, normalised_grid(self.shape, velocity.device) + displacement)

    def displacement(self, params: PairParams) -> torch.Tensor:
        """Each image's whole warp as a displacement (B, 2, ndim, *S) in voxels, :mod:`deepsim.spatial`'s
        convention: ``label = warp_labels(base_label, u)`` before the flips."""
        positions = self.positions(params.velocity.flatten(0, 1), params.affine.flatten(0, 1))
        return positions_to_displacement(positions).view(params.batch_size, 2, self.ndim, *self.shape)

    def _base_maps(self, params: PairParams) -> torch.Tensor:
        """The unwarped label map of every image, (2B, 1, *S) uint8 (K ≤ 256 classes)."""
        sources = params.sources.flatten()
        out = torch.zeros((sources.numel(), 1, *self.shape), dtype=torch.uint8, device=self.device)
        real = sources != _SHAPES
        if self.bank is not None and bool(real.any()):
            out[real] = self.bank.maps[sources[real]][:, None]
        for i in torch.nonzero(params.sources[:, 0] == _SHAPES).flatten().tolist():  # one map per pair, used twice
            noise = tuple(s[i : i + 1] for s in params.shapes_noise)
            out[2 * i : 2 * i + 2] = shapes_label_map(noise, params.shapes_velocity[i : i + 1], self.shape,
                                                      self.integration_shape, self.options.integration_steps)
        return out

    def _warp_labels(self, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.options.label_interpolation == "nearest":  # class indices < 256 are exact in float32
            return sample(labels.float(), positions, mode="nearest", padding_mode="zeros").long()
        # linear: argmax of the warped one-hot maps, _CLASS_CHUNK classes per grid_sample (they share its indexing)
        best = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        out = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)
        inside = sample(torch.ones_like(best), positions, padding_mode="zeros")  # outside the grid: background
        for first in range(0, self.num_classes, _CLASS_CHUNK):
            classes = torch.arange(first, min(first + _CLASS_CHUNK, self.num_classes), device=labels.device)
            onehot = (labels == classes.view(1, -1, *[1] * self.ndim)).float()  # (N, C, *S)
            warped = sample(onehot, positions, mode="bilinear", padding_mode="zeros")
            if first == 0:
                warped[:, 0] += 1 - inside[:, 0]
            value, index = warped.max(dim=1, keepdim=True)
            better = value > best
            best, out = torch.where(better, value, best), torch.where(better, index + first, out)
        return out.long()

    def synthesize(self, labels: torch.Tensor, params: PairParams) -> torch.Tensor:
        """Images (2B, 1, *S) in [0, 1] from warped class maps (2B, 1, *S), with the contrasts of ``params``."""
        nb, nd = labels.shape[0], self.ndim
        view = (nb, *[1] * (nd + 1))
        flat = labels.flatten(1)
        means = params.means.flatten(0, 1).gather(1, flat).view_as(labels)
        stds = params.stds.flatten(0, 1).gather(1, flat).view_as(labels)
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in params.seeds.flatten().tolist()]
        texture = torch.stack([torch.randn(labels.shape[1:], generator=g, device=self.device) for g in generators])
        x = means + stds * texture
        x = blur_per_item(x, params.blur.flatten(0, 1), max_sigma=self.options.blur_max)
        x = x * torch.exp(resize(params.log_bias.flatten(0, 1), self.shape))
        lo, hi = x.flatten(1).amin(1).view(view), x.flatten(1).amax(1).view(view)
        x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp_min(0)
        x = x.pow(torch.exp(params.log_gamma.flatten()).view(view))
        x = self._thick_slices(x, params.thick_axis.flatten(), params.thick_factor.flatten())
        noise = torch.stack([torch.randn(labels.shape[1:], generator=g, device=self.device) for g in generators])
        x = x + params.noise_std.flatten().view(view) * noise
        return x.clamp(0.0, 1.0)

    def _thick_slices(self, x: torch.Tensor, axes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Average slabs of ``factor`` voxels along ``axis`` (area resize down), then resize back linearly."""
        todo = torch.nonzero(factors > 1.0).flatten().tolist()
        if not todo:
            return x
        out = x.clone()
        for i, axis, factor in zip(todo, axes[todo].tolist(), factors[todo].tolist()):
            size = list(self.shape)
            size[axis] = max(2, round(self.shape[axis] / factor))
            low = F.interpolate(x[i : i + 1], size=size, mode="area")
            out[i : i + 1] = resize(low, self.shape)
        return out

    @staticmethod
    def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Flip pair i (B, 2, C, *S) along the spatial axes where ``flips[i]`` (B, ndim) is true."""
        rows = flips.tolist()
        if not any(any(r) for r in rows):
            return x
        out = x.clone()
        for i, row in enumerate(rows):
            axes = [2 + a for a, f in enumerate(row) if f]  # x[i] is (2, C, *S)
            if axes:
                out[i] = torch.flip(x[i], axes)
        return out
