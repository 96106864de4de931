"""MIND-SSC descriptors (Heinrich et al., MICCAI 2013) and the paper's MIND baseline loss.

The self-similarity context of a voxel compares patches around pairs of its neighbours rather than around the
voxel itself. The neighbours are the 2d voxels at ``dilation`` steps along each axis (4 in 2D, 6 in 3D); the pairs
are those neighbours at squared distance 2 (in units of ``dilation``) from each other: 4 pairs in 2D, 12 in 3D.
For a pair (a, b) and image I:

    diff_ab(q) = (I(q + dilation * a) - I(q + dilation * b))^2
    D_ab(p)    = mean of diff_ab over the (2 radius + 1)^d patch centred on p
    M_ab(p)    = D_ab(p) - min_c D_c(p)
    V(p)       = mean_c M_c(p), clamped to [0.001, 1000] x (mean of V over the image)
    MIND_ab(p) = exp(-M_ab(p) / V(p))

Borders use replication padding twice, as in the authors' code: shifted positions ``q + dilation * a`` outside the
image take the nearest image value, and patch positions outside the image take the nearest ``diff_ab``. The clamp
bounds are computed per image (the authors' per-batch mean is the same for their batch size 1) and carry no
gradient. MIND is unchanged by an intensity map ``a I + b`` with ``a > 0``: D and V both scale by ``a^2``.

MONAI has no MIND; this is our own vectorised version (shifts by slicing a padded image, a separable box filter).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MINDSSCLoss", "mind_ssc", "mind_ssc_pairs"]

# Lower bound of V when the whole image is constant (V = 0): keeps exp(-0 / V) = 1 instead of NaN.
_TINY = 1e-12


def mind_ssc_pairs(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs (a, b) of unit neighbour offsets at squared distance 2, each unordered pair once: 4 in 2D, 12 in 3D."""
    units = [tuple(sign if i == axis else 0 for i in range(ndim)) for axis in range(ndim) for sign in (-1, 1)]
    return [
        (a, b)
        for i, a in enumerate(units)
        for b in units[i + 1 :]
        if sum((p - q) ** 2 for p, q in zip(a, b)) == 2
    ]


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over (2 radius + 1)^d patches with replicated borders; (N, C, *S) -> (N, C, *S), separable."""
    ndim = x.ndim - 2
    x = F.pad(x, [radius] * (2 * ndim), mode="replicate")
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    for axis in range(ndim):
        kernel = tuple(2 * radius + 1 if i == axis else 1 for i in range(ndim))
        x = pool(x, kernel, stride=1)
    return x


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of every channel. image: (B, C, *S), 2D or 3D -> (B, C * P, *S) in (0, 1].

    P = 4 pairs in 2D, 12 in 3D (channel ``c * P + k`` is pair ``k`` of :func:`mind_ssc_pairs` on channel ``c``).
    """
    ndim = image.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"image must have shape (B, C, H, W) or (B, C, D, H, W); got {tuple(image.shape)}")
    if radius < 0 or dilation < 1:
        raise ValueError(f"need radius >= 0 and dilation >= 1, got radius={radius}, dilation={dilation}")
    b, c, *spatial = image.shape
    x = image.reshape(b * c, 1, *spatial)
    padded = F.pad(x, [dilation] * (2 * ndim), mode="replicate")

    def shifted(offset: tuple[int, ...]) -> torch.Tensor:
        index = [slice(None), slice(None)]
        index += [slice(dilation * (1 + o), dilation * (1 + o) + n) for o, n in zip(offset, spatial)]
        return padded[tuple(index)]

    pairs = mind_ssc_pairs(ndim)
    diff = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in pairs], dim=1)
    ssd = _box_mean(diff, radius)
    mind = ssd - ssd.amin(dim=1, keepdim=True)
    var = mind.mean(dim=1, keepdim=True)
    scale = var.detach().mean(dim=tuple(range(2, ndim + 2)), keepdim=True)
    var = var.minimum(1000.0 * scale).maximum((0.001 * scale).clamp_min(_TINY))
    return torch.exp(-mind / var).reshape(b, c * len(pairs), *spatial)


class MINDSSCLoss(nn.Module):
    """Mean squared difference of MIND-SSC descriptors. warped, fixed: (B, C, *S) -> scalar in [0, 1].

    0 for identical images and for images that differ by ``a x + b`` (a > 0). The fixed image's descriptor is a
    constant of the loss (computed without autograd).

    Args:
        spatial_dims: 2 or 3; inputs must match.
        radius: patch radius in voxels (2 in the paper).
        dilation: distance of the neighbours from the centre voxel, in voxels (2 in the paper).
    """

    def __init__(self, spatial_dims: int = 3, radius: int = 2, dilation: int = 2):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if radius < 0 or dilation < 1:
            raise ValueError(f"need radius >= 0 and dilation >= 1, got radius={radius}, dilation={dilation}")
        self.spatial_dims, self.radius, self.dilation = spatial_dims, int(radius), int(dilation)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if warped.ndim != self.spatial_dims + 2 or warped.shape != fixed.shape:
            raise ValueError(
                f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must share one (B, C, *S) shape "
                f"with {self.spatial_dims} spatial dimensions"
            )
        with torch.no_grad():
            fixed_mind = mind_ssc(fixed, self.radius, self.dilation)
        return torch.mean((mind_ssc(warped, self.radius, self.dilation) - fixed_mind) ** 2)
