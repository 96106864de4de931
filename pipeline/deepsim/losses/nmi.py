"""Normalised mutual information (NMI) with Gaussian Parzen windows, the paper's NMI baseline.

    NMI(X, Y) = (H(X) + H(Y)) / H(X, Y),    loss = 2 - NMI

H are Shannon entropies (nats) of a joint intensity histogram estimated with Gaussian Parzen windows: ``num_bins``
bins tile ``[vmin, vmax]`` (centres at the middle of each bin); every voxel spreads a unit mass over the bins with a
Gaussian of full width at half maximum ``fwhm_bins`` bin widths (the paper: 64 bins, FWHM one bin). Intensities
outside ``[vmin, vmax]`` are clamped to it. Our images are normalised to [0, 1] (percentiles 0.5/99.5, clipped), so
the default range is [0, 1]; the authors used vmax 1.5 for brains whose intensities were not clipped.

Range: the Parzen joint histogram is a proper joint distribution of its two marginals, so
``max(H(X), H(Y)) <= H(X, Y) <= H(X) + H(Y)`` and NMI lies in [1, 2]; the loss lies in [0, 1]. The loss is 0 only
when ``H(X) = H(Y) = H(X, Y)``, which the kernel's blur prevents even for identical images: an identical pair of
two-level images with both levels on bin centres scores NMI = 1.4485 (loss 0.5515) at FWHM one bin and tends to 2 as
the kernel narrows. Independent images score NMI close to 1. The constant 2 only shifts the loss; gradients are
those of -NMI, as in the authors' code.

Why not MONAI's ``GlobalMutualInformationLoss``: it returns the *unnormalised* MI ``H(X) + H(Y) - H(X, Y)`` (and
fixes the bins to [0, 1]), while the paper's baseline is the normalised form, which does not reward a warp for
merely changing the overlap's marginal entropies. Reaching into its ``parzen_windowing_gaussian`` for the
histogram would tie us to a private detail, and the histogram is a few lines, so it is written out here.

Differences from the authors' code, on purpose: each voxel's window is normalised to unit mass (theirs weights a
voxel on a bin centre ~13% more than one between two centres), and bin centres sit mid-bin rather than on a
``linspace(vmin, vmax)`` grid, so the bins exactly tile the range and FWHM equals the bin width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NMILoss", "normalized_mutual_information", "parzen_joint_distribution"]

# Entropy terms use p * log(max(p, eps)): far bins underflow to exactly 0 and d(p log p)/dp is -inf there.
_LOG_EPS = 1e-10


def _parzen_weights(samples: torch.Tensor, centres: torch.Tensor, sigma: float, vmin: float, vmax: float) -> torch.Tensor:
    """(B, N) intensities -> (B, N, K) Gaussian window weights, each voxel's row summing to 1."""
    x = samples.clamp(vmin, vmax).unsqueeze(-1)
    w = torch.exp(-0.5 * ((x - centres) / sigma) ** 2)
    return w / w.sum(dim=-1, keepdim=True)


def parzen_joint_distribution(
    x: torch.Tensor,
    y: torch.Tensor,
    num_bins: int = 64,
    vmin: float = 0.0,
    vmax: float = 1.0,
    fwhm_bins: float = 1.0,
) -> torch.Tensor:
    """Parzen estimate of the joint intensity distribution. x, y: (B, N) samples -> (B, num_bins, num_bins), sum 1.

    ``p[b, i, j] = 1/N sum_n w_i(x[b, n]) w_j(y[b, n])`` with ``w`` the unit-mass Gaussian windows described in
    the module docstring; rows index the bins of ``x``.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both have shape (B, N); got {tuple(x.shape)} and {tuple(y.shape)}")
    width = (vmax - vmin) / num_bins
    sigma = fwhm_bins * width / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    centres = vmin + width * (torch.arange(num_bins, device=x.device, dtype=x.dtype) + 0.5)
    wx = _parzen_weights(x, centres, sigma, vmin, vmax)
    wy = _parzen_weights(y, centres, sigma, vmin, vmax)
    return torch.bmm(wx.transpose(1, 2), wy) / x.shape[1]


def _entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_LOG_EPS))).sum(dim=dims)


def normalized_mutual_information(
    x: torch.Tensor,
    y: torch.Tensor,
    num_bins: int = 64,
    vmin: float = 0.0,
    vmax: float = 1.0,
    fwhm_bins: float = 1.0,
    sample_ratio: float = 1.0,
) -> torch.Tensor:
    """NMI = (H(X) + H(Y)) / H(X, Y) per batch item. x, y: (B, C, *S) -> (B,) in [1, 2].

    All channels and voxels of an item are pooled into one histogram. With ``sample_ratio < 1`` the histogram
    uses ``max(1, int(sample_ratio * n))`` of the ``n`` voxels, the same random positions in ``x``, ``y`` and
    every batch item, drawn by ``torch.randperm`` on the inputs' device (so replayable under ``torch.manual_seed``).
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if sample_ratio < 1.0:
        n = x.shape[1]
        keep = torch.randperm(n, device=x.device)[: max(1, int(sample_ratio * n))]
        x, y = x[:, keep], y[:, keep]
    p_xy = parzen_joint_distribution(x, y, num_bins, vmin, vmax, fwhm_bins)
    h_x = _entropy(p_xy.sum(dim=2), (1,))
    h_y = _entropy(p_xy.sum(dim=1), (1,))
    h_xy = _entropy(p_xy, (1, 2))
    return (h_x + h_y) / h_xy


class NMILoss(nn.Module):
    """2 - NMI(warped, fixed) with Gaussian Parzen windows, mean over the batch. (B, C, *S) -> scalar in [0, 1].

    Not 0 for identical images (see the module docstring); its minimum is reached there all the same.

    Args:
        num_bins: histogram bins over ``[vmin, vmax]`` (64 in the paper).
        vmin, vmax: intensity range of the bins; values outside are clamped.
        fwhm_bins: kernel full width at half maximum, in bin widths (1 in the paper).
        sample_ratio: fraction of voxels drawn at random for each evaluation (0.1 in the paper); 1 uses all.
    """

    def __init__(
        self,
        num_bins: int = 64,
        vmin: float = 0.0,
        vmax: float = 1.0,
        fwhm_bins: float = 1.0,
        sample_ratio: float = 0.1,
    ):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        if not vmax > vmin:
            raise ValueError(f"vmax must exceed vmin, got vmin={vmin}, vmax={vmax}")
        if not fwhm_bins > 0:
            raise ValueError(f"fwhm_bins must be positive, got {fwhm_bins}")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must lie in (0, 1], got {sample_ratio}")
        self.num_bins, self.vmin, self.vmax = int(num_bins), float(vmin), float(vmax)
        self.fwhm_bins, self.sample_ratio = float(fwhm_bins), float(sample_ratio)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        nmi = normalized_mutual_information(
            warped, fixed, self.num_bins, self.vmin, self.vmax, self.fwhm_bins, self.sample_ratio
        )
        return 2.0 - nmi.mean()
