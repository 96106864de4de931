"""Similarity losses for registration, each selectable by one name (``build_similarity``).

Every loss is a module ``loss(warped, fixed) -> scalar`` that is 0 for identical inputs and grows with
dissimilarity. Names: ``mse``, ``ncc`` (local NCC), ``deepsim-ae`` and ``deepsim-seg`` (DeepSim with a frozen
auto-encoder or segmentation feature net). A new loss (NMI, MIND, NCC+sup) is one class plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from torch import nn

__all__ = [
    "cosine_similarity_map",
    "deepsim_similarity",
    "MSELoss",
    "LocalNCCLoss",
    "DeepSimLoss",
    "SIMILARITY_NAMES",
    "build_similarity",
]


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
    return torch.stack([cosine_similarity_map(fa, fb, eps).mean() for fa, fb in zip(feats_a, feats_b)]).mean()


class MSELoss(nn.Module):
    """Mean squared intensity difference. warped, fixed: (B, C, *S) -> scalar >= 0."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.mean((warped - fixed) ** 2)


class LocalNCCLoss(nn.Module):
    """1 - mean squared local NCC over cubic windows of ``window`` voxels (9 in the paper), in [0, 1].

    Wraps MONAI's ``LocalNormalizedCrossCorrelationLoss`` (which returns -NCC^2 in [-1, 0]); the shift by 1 only
    makes 0 the optimum like every other loss here and does not change gradients.
    """

    def __init__(self, spatial_dims: int = 3, window: int = 9):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number of voxels, got {window}")
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=window)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.lncc(warped, fixed)


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

    def train(self, mode: bool = True) -> "DeepSimLoss":
        # The feature net stays in eval mode whatever the trainer asks: it is a fixed part of the loss.
        super().train(mode)
        self.feature_net.eval()
        return self

    def _select(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return feats if self.levels is None else [feats[i] for i in self.levels]

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fixed_feats = self._select(self.feature_net.features(fixed))
        warped_feats = self._select(self.feature_net.features(warped))
        return 1.0 - deepsim_similarity(warped_feats, fixed_feats, self.eps)


def _needs_feature_net(name: str) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, feature_net: nn.Module | None = None, **kwargs) -> nn.Module:
        if feature_net is None:
            raise ValueError(f"similarity {name!r} needs a trained feature net (run its pretraining stage first)")
        return DeepSimLoss(feature_net, **kwargs)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mse": lambda spatial_dims, feature_net=None, **kw: MSELoss(),
    "ncc": lambda spatial_dims, feature_net=None, **kw: LocalNCCLoss(spatial_dims, **kw),
    "deepsim-ae": _needs_feature_net("deepsim-ae"),
    "deepsim-seg": _needs_feature_net("deepsim-seg"),
}
SIMILARITY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: Which pretrained feature net each similarity needs ("ae", "seg" or None).
FEATURE_NET_OF: dict[str, str | None] = {"mse": None, "ncc": None, "deepsim-ae": "ae", "deepsim-seg": "seg"}


def build_similarity(name: str, spatial_dims: int = 3, feature_net: nn.Module | None = None, **kwargs) -> nn.Module:
    """Instantiate the similarity loss called ``name`` (one of ``SIMILARITY_NAMES``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITY_NAMES)}")
    return _REGISTRY[name](spatial_dims, feature_net=feature_net, **kwargs)
