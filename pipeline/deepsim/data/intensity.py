"""Contrast randomisation of network inputs, drawn on the training device (GPU-side augmentation).

Why: the embedded brains are synthesised with one T1-like contrast model, so a network trained on them sees a narrow
range of intensities. Randomising each input image's contrast independently (a random monotonic intensity curve, a
gamma, a smooth multiplicative bias field, blur and noise) teaches the network to ignore contrast; the loss is still
computed on the clean images (see :class:`deepsim.engine.tasks.RegistrationTask`), so every similarity keeps its
meaning. SynthMorph (Hoffmann et al., 2022) uses the same idea with fully random contrasts.

MONAI has each of these transforms (``RandHistogramShift``, ``RandAdjustContrast``, ``RandBiasField``,
``RandGaussianNoise``), but they draw on the host with NumPy: measured on the 2-core CPU at 160×192×160 they take
0.55 s per image together, ten times a GPU training step. Here everything is batched torch on the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["ContrastRandomization", "contrast_randomization"]


@dataclass(frozen=True)
class ContrastRandomization:
    """Callable ``(B, 1, *S) images in [0, 1] -> (B, 1, *S) in [0, 1]`` with an independent contrast per image.

    Args:
        control_points: knots of the random monotonic intensity curve (piecewise linear, like MONAI's
            ``RandHistogramShift``); 0 disables it.
        log_gamma_sd: sd of log(gamma) for ``x ** gamma``.
        bias_strength: max |log bias| of the multiplicative bias field (a random 4^ndim grid, upsampled).
        blur_sigma_max: Gaussian blur sigma drawn from U(0, max) voxels.
        noise_sd_max: additive Gaussian noise sd drawn from U(0, max).
        generator_seed: seeds this callable's own torch generator (on the images' device), so runs repeat.
    """

    control_points: int = 6
    log_gamma_sd: float = 0.4
    bias_strength: float = 0.3
    blur_sigma_max: float = 1.0
    noise_sd_max: float = 0.05
    generator_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_generators", {})

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self._generators  # type: ignore[attr-defined]
        key = str(device)
        if key not in generators:
            generators[key] = torch.Generator(device=device).manual_seed(int(self.generator_seed))
        return generators[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator states by device, so a resumed training run draws the same contrasts."""
        return {key: gen.get_state() for key, gen in self._generators.items()}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self._generator(torch.device(key)).set_state(value)

    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self._generator(device), device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim not in (4, 5) or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, *S) with 2 or 3 spatial axes, got {tuple(images.shape)}")
        x = images.float()
        batch, ndim, device = x.shape[0], x.ndim - 2, x.device
        lo = x.flatten(1).amin(1).view(-1, *[1] * (ndim + 1))
        hi = x.flatten(1).amax(1).view(-1, *[1] * (ndim + 1))
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
        if self.control_points > 0:
            x = self._monotonic_curve(x, batch, device)
        if self.log_gamma_sd > 0:
            log_gamma = (self._uniform((batch,), device) * 2 - 1) * 2 * self.log_gamma_sd
            x = x.clamp_min(0).pow(torch.exp(log_gamma).view(-1, *[1] * (ndim + 1)))
        if self.bias_strength > 0:
            coarse = (self._uniform((batch, 1, *[4] * ndim), device) * 2 - 1) * self.bias_strength
            mode = "trilinear" if ndim == 3 else "bilinear"
            x = x * torch.exp(F.interpolate(coarse, size=x.shape[2:], mode=mode, align_corners=True))
        if self.blur_sigma_max > 0:
            x = self._blur(x, float(self._uniform((1,), device)) * self.blur_sigma_max)
        if self.noise_sd_max > 0:
            sd = self._uniform((batch,), device).view(-1, *[1] * (ndim + 1)) * self.noise_sd_max
            x = x + sd * torch.randn(x.shape, generator=self._generator(device), device=device)
        lo = x.flatten(1).amin(1).view(-1, *[1] * (ndim + 1))
        hi = x.flatten(1).amax(1).view(-1, *[1] * (ndim + 1))
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).to(images.dtype)

    def _monotonic_curve(self, x: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Map [0, 1] through a random increasing piecewise-linear curve with ``control_points`` inner knots."""
        k = self.control_points
        knots_in = torch.linspace(0, 1, k + 2, device=device)
        steps = self._uniform((batch, k + 1), device) + 0.2  # positive increments: monotonic, never flat
        knots_out = torch.cat([torch.zeros(batch, 1, device=device), steps.cumsum(1)], dim=1)
        knots_out = knots_out / knots_out[:, -1:]
        flat = x.flatten(1).clamp(0, 1)
        seg = torch.bucketize(flat, knots_in[1:-1])  # segment index 0..k
        x0, x1 = knots_in[seg], knots_in[seg + 1]
        y0, y1 = knots_out.gather(1, seg), knots_out.gather(1, seg + 1)
        out = y0 + (flat - x0) / (x1 - x0) * (y1 - y0)
        return out.view_as(x)

    @staticmethod
    def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Separable Gaussian blur with one sigma (voxels) for the whole batch; sigma < 0.1 does nothing."""
        if sigma < 0.1:
            return x
        radius = max(1, int(round(3 * sigma)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        ndim = x.ndim - 2
        conv = F.conv3d if ndim == 3 else F.conv2d
        for axis in range(ndim):
            shape = [1, 1] + [1] * ndim
            shape[2 + axis] = kernel.numel()
            padding = [0] * ndim
            padding[axis] = radius
            x = conv(x, kernel.view(shape), padding=tuple(padding))
        return x


def contrast_randomization(enabled: bool, seed: int = 0, **kwargs: float) -> ContrastRandomization | None:
    """The augmentation for bundle configs: ``None`` when ``enabled`` is false (the default everywhere)."""
    return ContrastRandomization(generator_seed=seed, **kwargs) if enabled else None
