"""DeepSim: semantic similarity of frozen multi-level features (Czolbe, Krause, Feragen, MIDL 2021).

    DeepSim(f, w) = 1/L sum_l mean_p cos(F_l(f)_p, F_l(w)_p),    loss = 1 - DeepSim
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["DeepSimLoss", "cosine_similarity_map", "deepsim_similarity"]


def cosine_similarity_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity of feature vectors per pixel. a, b: (B, C, *S) -> (B, *S) in [-1, 1].

    The product of norms is clamped below at ``eps``, so identical non-zero vectors score exactly 1 and an all-zero
    vector scores 0 rather than NaN. (The paper adds eps inside each norm instead, which pulls the score of small
    feature vectors towards 0; the two agree wherever ``|a||b| >> eps``.)
    """
    dot = (a * b).sum(dim=1)
    # vector_norm has a zero (not NaN) gradient at the zero vector, unlike sqrt(sum of squares).
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return dot / norms.clamp_min(eps)


def deepsim_similarity(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """DeepSim = 1/L sum_l mean_p cos(F_l(a)_p, F_l(b)_p). Lists of (B, C_l, *S_l) -> scalar in [-1, 1]."""
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError(f"need the same non-zero number of feature levels, got {len(feats_a)} and {len(feats_b)}")
    # float32 even under bf16 autocast: a bf16 dot product over 64 channels keeps ~3 significant digits
    return torch.stack([cosine_similarity_map(fa.float(), fb.float(), eps).mean()
                        for fa, fb in zip(feats_a, feats_b)]).mean()


class DeepSimLoss(nn.Module):
    """1 - DeepSim(fixed, warped) with a frozen feature net (Czolbe et al., MIDL 2021). -> scalar in [0, 2].

    ``feature_net`` must have ``features(x) -> list[(B, C_l, *S_l)]``. Its parameters are frozen and it is kept in
    eval mode; gradients flow through it to the warped image (and so to the registration network) only. The fixed
    image's features are computed without autograd: they are constants of the loss.

    Args:
        feature_net: trained feature network (AE or segmentation).
        levels: indices of the feature levels to use (default: all, as in the paper).
    """

    def __init__(self, feature_net: nn.Module, levels: Sequence[int] | None = None, eps: float = 1e-6):
        super().__init__()
        if not hasattr(feature_net, "features"):
            raise TypeError(f"feature_net must provide .features(x); got {type(feature_net).__name__}")
        self.feature_net = feature_net.eval()
        for p in self.feature_net.parameters():
            p.requires_grad_(False)
        self.levels = None if levels is None else tuple(levels)
        self.eps = eps

    @classmethod
    def from_bundle(cls, source: str | Path = "brain_mri", kind: str = "seg", levels: Sequence[int] | None = None,
                    device: torch.device | str = "cpu") -> DeepSimLoss:
        """A ready DeepSim loss from a trained feature net, for any registration code (a plain MONAI loop too).

        ``source`` is an installed bundle name (``"brain_mri"`` ships feature nets trained by our pipeline), a
        bundle folder or pipeline output folder holding ``models/feature_<kind>.pt``, or such a checkpoint file.
        ``kind`` is ``"seg"`` (DeepSim-seg) or ``"ae"`` (DeepSim-AE). The weights load with
        ``torch.load(weights_only=True)``; the architecture comes from the checkpoint. Inputs must be prepared like
        the net's training images: one channel, intensities scaled to [0, 1] (our datasets clip at the 0.5 and
        99.5 percentiles), sizes divisible by 8, the spacing of its training data (the bundle's docs say which).
        """
        from deepsim.engine.checkpoints import load_network

        path = Path(source)
        if path.suffix != ".pt":
            if not path.exists() and "/" not in str(source):
                from deepsim.resources import bundle_dir

                path = bundle_dir(str(source))
            path = path / "models" / f"feature_{kind}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trained feature net (run the feature_{kind} stage, or pass a "
                                    "bundle/output folder with models/feature_<kind>.pt)")
        return cls(load_network(path, map_location=device), levels=levels).to(device)

    def train(self, mode: bool = True) -> DeepSimLoss:
        # The feature net stays in eval mode whatever the trainer asks: it is a fixed part of the loss.
        super().train(mode)
        self.feature_net.eval()
        return self

    def _select(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats if self.levels is None else [feats[i] for i in self.levels]

    def _fixed_features(self, fixed: torch.Tensor) -> list[torch.Tensor]:
        """Features of the fixed image, computed once per fixed tensor: instance optimisation calls the loss many
        times with the same (unchanged) fixed image; training passes a new tensor every step."""
        # the same tensor object, not changed in place since (its version counter), under the same autocast state
        key = (fixed._version, torch.is_autocast_enabled(fixed.device.type))
        if getattr(self, "_cache_ref", None) is not fixed or self._cache_key != key:
            with torch.no_grad():
                self._cache_feats = self._select(self.feature_net.features(fixed))
            self._cache_key, self._cache_ref = key, fixed
        return self._cache_feats

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        fixed_feats = self._fixed_features(fixed)
        warped_feats = self._select(self.feature_net.features(warped))
        return 1.0 - deepsim_similarity(warped_feats, fixed_feats, self.eps)
