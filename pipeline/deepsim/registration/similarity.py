"""Similarity losses for registration, each selectable by one name (``build_similarity``).

Every loss is a module ``loss(warped, fixed) -> scalar`` that is smallest for identical inputs and grows with
dissimilarity. Names: ``mse``, ``ncc`` (local NCC), ``deepsim-ae`` and ``deepsim-seg`` (DeepSim with a frozen
auto-encoder or segmentation feature net), and the paper's other baselines ``nmi`` (normalised mutual information,
:mod:`.mutual_information`), ``mind`` (MIND-SSC, :mod:`.mind`) and ``ncc-sup`` (local NCC plus a label term).
All are 0 for identical inputs except ``nmi``, whose Parzen estimate keeps it above 0 (see its module).

A loss that compares label maps too has a class attribute ``needs_labels = True`` and is called as
``loss(warped, fixed, ddf=..., moving_label=..., fixed_label=...)``; ``RegistrationObjective`` passes these
only to such a loss, so the others keep the two-argument call. A new loss is one class plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

from deepsim.engine.tasks import LabelIndexer
from deepsim.registration.mind import MINDSSCLoss
from deepsim.registration.mutual_information import NMILoss
from deepsim.spatial import warp_onehot

__all__ = [
    "SIMILARITY_NAMES",
    "DeepSimLoss",
    "box_mean",
    "LocalNCCLoss",
    "MINDSSCLoss",
    "MSELoss",
    "NCCSupLoss",
    "NMILoss",
    "build_similarity",
    "cosine_similarity_map",
    "deepsim_similarity",
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
    # float32 even under bf16 autocast: a bf16 dot product over 64 channels keeps ~3 significant digits
    return torch.stack([cosine_similarity_map(fa.float(), fb.float(), eps).mean()
                        for fa, fb in zip(feats_a, feats_b)]).mean()


class MSELoss(nn.Module):
    """Mean squared intensity difference. warped, fixed: (B, C, *S) -> scalar >= 0."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.mean((warped - fixed) ** 2)


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
    from deepsim.registration.filters import filter_axis

    with torch.no_grad():
        for axis in range(x.ndim - 2):
            x = filter_axis(x, [1.0 / window] * window, axis, padding="zeros")
    return x


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the ``window``^d box around every voxel, zeros outside: (B, C, *S) -> (B, C, *S).

    Separable, dividing by the full window at the border as a zero-padded box convolution does. On a GPU: one 1D
    average pool per axis (``count_include_pad``), 3 x ``window`` reads per voxel instead of ``window``^3. On the
    CPU, where PyTorch's 3D pools are slow, shifted sums (:func:`deepsim.registration.filters.filter_axis`) with
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
                from deepsim.workflow import bundle_dir

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


class NCCSupLoss(nn.Module):
    """NCC+sup: local NCC of the images + ``label_weight`` x a label term, the paper's semi-supervised baseline.

        loss = LocalNCCLoss(warped, fixed) + label_weight * L(warp(onehot(moving_label), ddf), onehot(fixed_label))

    ``L`` is MONAI's soft ``DiceLoss`` over the foreground classes (``label_term="dice"``, default; in [0, 1]) or
    the mean squared difference of the one-hot maps over all classes (``"mse"``, as in the authors' code). The
    one-hot map is warped bilinearly (:func:`deepsim.spatial.warp_onehot`) with the field that warped the image,
    so the label term has a gradient with respect to ``ddf``; a nearest-neighbour warp would have none. Label
    values (e.g. FreeSurfer 1002, 2035) become class indices through :class:`LabelIndexer`; 0 is background.

    Called as ``forward(warped, fixed, *, ddf, moving_label, fixed_label)``: images (B, 1, *S), ``ddf``
    (B, ndim, *S) voxels, labels (B, 1, *S) integer label values -> scalar >= 0, about 0 for identical pairs.

    Args:
        label_values: every label value of the dataset (a prepared datalist's ``label_values``).
        spatial_dims: 2 or 3.
        window: local NCC window in voxels (9 in the paper).
        label_term: ``"dice"`` or ``"mse"``.
        label_weight: weight of the label term (1 in the paper).
        label_downsample: integer factor f: the label term is computed on a grid f times coarser — one-hots
            average-pooled to class fractions, the field average-pooled and divided by f (coarse voxels). With 83
            brain labels the full-resolution one-hot warp cost ~10x the rest of a CPU step; f = 2 cuts its voxels
            8x (3D). 1 reproduces the paper's full-resolution term.
    """

    needs_labels = True

    def __init__(
        self,
        label_values: Sequence[int],
        spatial_dims: int = 3,
        window: int = 9,
        label_term: str = "dice",
        label_weight: float = 1.0,
        label_downsample: int = 2,
    ):
        super().__init__()
        if label_term not in ("dice", "mse"):
            raise ValueError(f"label_term must be 'dice' or 'mse', got {label_term!r}")
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}")
        if int(label_downsample) != label_downsample or label_downsample < 1:
            raise ValueError(f"label_downsample must be a positive integer, got {label_downsample}")
        self.label_downsample = int(label_downsample)
        self.ncc = LocalNCCLoss(spatial_dims, window)
        self.indexer = LabelIndexer(label_values)
        self.label_term, self.label_weight = label_term, float(label_weight)
        self.dice = DiceLoss(include_background=False)

    def _onehot(self, labels: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """(B, 1, *S) label values -> (B, K, *S / factor) class fractions over factor^d blocks (one-hot for 1).

        Equal to average-pooling the full-resolution one-hot map (trailing voxels that do not fill a block are
        dropped, like ``avg_pool``), but counted with one ``bincount``: the full-resolution K-channel map of 83
        brain labels is never built.
        """
        index = self.indexer.to_index(torch.as_tensor(labels)[:, 0])
        k = self.indexer.num_classes
        if factor == 1:
            return F.one_hot(index, k).movedim(-1, 1).float()
        b, shape = index.shape[0], [n // factor for n in index.shape[1:]]
        index = index[(slice(None), *[slice(0, n * factor) for n in shape])]
        # block id of every voxel: its coordinates divided by the factor, raveled over the coarse grid
        block = torch.zeros_like(index)
        for axis, n in enumerate(shape):
            coord = torch.arange(n * factor, device=index.device) // factor
            block = block * n + coord.view(*[-1 if a == axis else 1 for a in range(len(shape))])
        cells = int(torch.tensor(shape).prod())
        flat = (torch.arange(b, device=index.device).view(b, *[1] * len(shape)) * k + index) * cells + block
        counts = torch.bincount(flat.reshape(-1), minlength=b * k * cells).float()
        return counts.view(b, k, *shape) / factor ** len(shape)

    def label_loss(self, moving_label: torch.Tensor, fixed_label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """The label term alone: L(warp(onehot(moving_label), ddf), onehot(fixed_label))."""
        f = self.label_downsample
        moving, target = self._onehot(moving_label, f), self._onehot(fixed_label, f)
        if f > 1:
            pool = F.avg_pool3d if ddf.ndim == 5 else F.avg_pool2d
            ddf = pool(ddf, f) / f
        warped = warp_onehot(moving, ddf)
        if self.label_term == "dice":
            return self.dice(warped, target)
        return torch.mean((warped - target) ** 2)

    def forward(
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        *,
        ddf: torch.Tensor,
        moving_label: torch.Tensor,
        fixed_label: torch.Tensor,
    ) -> torch.Tensor:
        return self.ncc(warped, fixed) + self.label_weight * self.label_loss(moving_label, fixed_label, ddf)


def _needs_feature_net(name: str) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, feature_net: nn.Module | None = None, label_values=None, **kwargs) -> nn.Module:
        if feature_net is None:
            raise ValueError(f"similarity {name!r} needs a trained feature net (run its pretraining stage first)")
        return DeepSimLoss(feature_net, **kwargs)

    return build


def _ncc_sup(spatial_dims: int, feature_net: nn.Module | None = None, label_values=None, **kwargs) -> nn.Module:
    if label_values is None:
        raise ValueError("similarity 'ncc-sup' needs label_values (the 'label_values' of the prepared datalist)")
    return NCCSupLoss(label_values, spatial_dims, **kwargs)


# Each builder takes (spatial_dims, feature_net=None, label_values=None, **loss_kwargs) and ignores what it needs not.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mse": lambda spatial_dims, feature_net=None, label_values=None, **kw: MSELoss(),
    "ncc": lambda spatial_dims, feature_net=None, label_values=None, **kw: LocalNCCLoss(spatial_dims, **kw),
    "deepsim-ae": _needs_feature_net("deepsim-ae"),
    "deepsim-seg": _needs_feature_net("deepsim-seg"),
    "nmi": lambda spatial_dims, feature_net=None, label_values=None, **kw: NMILoss(**kw),
    "mind": lambda spatial_dims, feature_net=None, label_values=None, **kw: MINDSSCLoss(spatial_dims, **kw),
    "ncc-sup": _ncc_sup,
}
SIMILARITY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: Which pretrained feature net each similarity needs ("ae", "seg" or None).
FEATURE_NET_OF: dict[str, str | None] = {
    "mse": None, "ncc": None, "deepsim-ae": "ae", "deepsim-seg": "seg", "nmi": None, "mind": None, "ncc-sup": None,
}  # fmt: skip


def build_similarity(
    name: str,
    spatial_dims: int = 3,
    feature_net: nn.Module | None = None,
    label_values: Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Instantiate the similarity loss called ``name`` (one of ``SIMILARITY_NAMES``).

    ``feature_net`` is used by the DeepSim losses only, ``label_values`` by ``ncc-sup`` only; ``kwargs`` go to the
    loss's constructor.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITY_NAMES)}")
    return _REGISTRY[name](spatial_dims, feature_net=feature_net, label_values=label_values, **kwargs)
