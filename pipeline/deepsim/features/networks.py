"""Feature networks whose frozen multi-level encoder features define the DeepSim similarity.

Both networks share :class:`FeatureEncoder`: a stack of stages, each halving the resolution (strided 3x3 conv,
LeakyReLU, 3x3 conv, LeakyReLU), as in the DeepSim paper's U-Net backbone, where every encoder stage is strided and
every stage output is one feature level. Levels therefore live at 1/2, 1/4, 1/8 ... of the input resolution, which
keeps the loss cheap next to the registration network.

- :class:`SegmentationFeatureNet` (DeepSim-seg): U-Net (skip connections) predicting label logits.
- :class:`AutoEncoderFeatureNet` (DeepSim-AE): encoder-decoder without skips, reconstructing the image, so the
  bottleneck must carry the content.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FeatureEncoder", "SegmentationFeatureNet", "AutoEncoderFeatureNet", "build_feature_net"]


def _conv(spatial_dims: int, cin: int, cout: int, stride: int = 1) -> nn.Module:
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return conv(cin, cout, kernel_size=3, stride=stride, padding=1)


class _Stage(nn.Sequential):
    def __init__(self, spatial_dims: int, cin: int, cout: int, stride: int):
        super().__init__(
            _conv(spatial_dims, cin, cout, stride),
            nn.LeakyReLU(0.2),
            _conv(spatial_dims, cout, cout),
            nn.LeakyReLU(0.2),
        )


class FeatureEncoder(nn.Module):
    """Strided encoder. x: (B, C_in, *S) with S divisible by 2**len(channels) -> list of (B, c_l, *S / 2**l)."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not channels:
            raise ValueError("channels must list at least one level")
        cins = [in_channels, *channels[:-1]]
        self.stages = nn.ModuleList(_Stage(spatial_dims, ci, co, 2) for ci, co in zip(cins, channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class _FeatureNet(nn.Module):
    """Common part: an encoder and the ``features`` method the DeepSim loss calls."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)
        self.encoder = FeatureEncoder(spatial_dims, in_channels, channels)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-level encoder features: list of (B, c_l, *S / 2**(l+1)), finest level first."""
        return self.encoder(x)


class SegmentationFeatureNet(_FeatureNet):
    """U-Net segmenter for DeepSim-seg. x: (B, C_in, *S) -> logits at half resolution (B, num_classes, *S / 2).

    The decoder stops at half resolution: a full-resolution decoder stage and an 83-class loss at full resolution
    cost most of the step on the 2-core CPU (measured at 80x96x80: 4.7 s per step with a full-resolution decoder,
    1.7 s with upsampled logits), and only the encoder features are used by the DeepSim loss.
    Use :meth:`segment` for a full-resolution label prediction.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__(spatial_dims, in_channels, channels)
        self.decoder = nn.ModuleList()
        cin = channels[-1]
        for skip in reversed(channels[:-1]):  # coarse to fine, ending at the first (1/2) level
            self.decoder.append(_Stage(spatial_dims, cin + skip, skip, 1))
            cin = skip
        self.head = (nn.Conv3d if spatial_dims == 3 else nn.Conv2d)(cin, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for stage, skip in zip(self.decoder, reversed(feats[:-1])):
            y = stage(torch.cat([_upsample(y, skip.shape[2:]), skip], dim=1))
        return self.head(y)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Class index per voxel at the input's resolution: (B, 1, *S) int64."""
        return _upsample(self(x), x.shape[2:]).argmax(dim=1, keepdim=True)


class AutoEncoderFeatureNet(_FeatureNet):
    """Auto-encoder for DeepSim-AE (no skip connections). x: (B, C, *S) -> reconstruction (B, C, *S).

    Like the segmenter, the decoder ends at half resolution and the reconstruction is upsampled (CPU cost).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__(spatial_dims, in_channels, channels)
        self.decoder = nn.ModuleList()
        cin = channels[-1]
        for cout in reversed(channels[:-1]):
            self.decoder.append(_Stage(spatial_dims, cin, cout, 1))
            cin = cout
        self.head = _conv(spatial_dims, cin, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for stage, level in zip(self.decoder, reversed(feats[:-1])):
            y = stage(_upsample(y, level.shape[2:]))
        return _upsample(self.head(y), x.shape[2:])


def build_feature_net(kind: str, spatial_dims: int, in_channels: int = 1, num_classes: int | None = None,
                      channels: Sequence[int] = (16, 32, 64)) -> _FeatureNet:
    """Construct a feature net from plain values (the form stored beside checkpoints)."""
    if kind == "seg":
        if not num_classes or num_classes < 2:
            raise ValueError(f"a segmentation feature net needs num_classes >= 2, got {num_classes}")
        return SegmentationFeatureNet(spatial_dims, in_channels, num_classes, channels)
    if kind == "ae":
        return AutoEncoderFeatureNet(spatial_dims, in_channels, channels)
    raise ValueError(f"feature net kind must be 'seg' or 'ae', got {kind!r}")
