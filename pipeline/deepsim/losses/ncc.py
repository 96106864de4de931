"""Local normalised cross-correlation (NCC), the paper's NCC baseline, and the fast box filter it rests on."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deepsim.filters import filter_axis

__all__ = ["LocalNCCLoss", "box_mean"]


class _ShiftedBoxMean(torch.autograd.Function):
    """The CPU box mean as shifted sums, with its own backward: zero-padded averaging with a symmetric window is its
    own adjoint, so the gradient is the same filter applied to the incoming gradient. (Autograd through the shifted
    slices would allocate a zero tensor of the padded size for every tap: that was most of a step's time.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:
        ctx.window = window
        return _shifted_box_mean(x, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shifted_box_mean(grad, ctx.window), None


def _shifted_box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    with torch.no_grad():
        for axis in range(x.ndim - 2):
            x = filter_axis(x, [1.0 / window] * window, axis, padding="zeros")
    return x


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the ``window``^d box around every voxel, zeros outside: (B, C, *S) -> (B, C, *S).

    Separable, dividing by the full window at the border as a zero-padded box convolution does. On a GPU: one 1D
    average pool per axis (``count_include_pad``), 3 x ``window`` reads per voxel instead of ``window``^3. On the
    CPU, where PyTorch's 3D pools are slow, shifted sums (:func:`deepsim.filters.filter_axis`) with
    their own backward compute the same numbers several times faster (forward and backward, 80×96×80, measured on
    our 2-core machine).
    """
    ndim = x.ndim - 2
    if x.device.type == "cpu":
        return _ShiftedBoxMean.apply(x, window)
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    for axis in range(ndim):
        kernel, padding = [1] * ndim, [0] * ndim
        kernel[axis], padding[axis] = window, window // 2
        if x.shape[2 + axis] < window:  # pooling refuses inputs smaller than the kernel: pad explicitly
            pad = [0] * (2 * ndim)
            pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = window // 2
            x, padding[axis] = F.pad(x, pad), 0
        x = pool(x, kernel_size=kernel, stride=1, padding=padding, count_include_pad=True)
    return x


class LocalNCCLoss(nn.Module):
    """1 - mean squared local NCC over cubic windows of ``window`` voxels (9 in the paper), in [0, 1].

    The same quantity as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel (which returns
    -NCC^2 in [-1, 0]; the shift by 1 only makes 0 the optimum like every other loss here), tested equal to it.
    Computed faster: the five local statistics (means of t, p, t², p², tp) are box-filtered together as channels of
    one tensor with separable average pools (:func:`box_mean`) rather than 15 separate padded convolutions, and
    always in float32 (the variances subtract nearly equal numbers; bf16 would cancel them away).
    """

    def __init__(self, spatial_dims: int = 3, window: int = 9, smooth_dr: float = 1e-5):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number of voxels, got {window}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.window, self.smooth_dr = spatial_dims, window, float(smooth_dr)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if warped.shape != fixed.shape or warped.ndim != self.spatial_dims + 2:
            raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must both be "
                             f"(B, C, *S) with {self.spatial_dims} spatial dimensions")
        with torch.autocast(device_type=warped.device.type, enabled=False):
            p, t = warped.float(), fixed.float()
            channels = p.shape[1]
            means = box_mean(torch.cat([t, p, t * t, p * p, t * p], dim=1), self.window)
            t_mean, p_mean, t2_mean, p2_mean, tp_mean = means.split(channels, dim=1)
            n = float(self.window**self.spatial_dims)  # MONAI's sums are n x these means
            cross = n * (tp_mean - p_mean * t_mean)
            t_var = (n * (t2_mean - t_mean * t_mean)).clamp_min(self.smooth_dr)
            p_var = (n * (p2_mean - p_mean * p_mean)).clamp_min(self.smooth_dr)
            return 1.0 - (cross * cross / (t_var * p_var)).mean()
