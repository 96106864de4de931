"""Label-supervised registration losses: the label overlap term (SynthMorph's loss) and NCC+sup (the paper's
semi-supervised baseline), both on one-hot label maps warped with the registration's field.

Both are called as ``forward(warped, fixed, *, ddf, moving_label, fixed_label)``: images (B, 1, *S), ``ddf``
(B, ndim, *S) voxels, labels (B, 1, *S) integer label values -> scalar >= 0, about 0 for identical pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

from deepsim.labels import LabelIndexer
from deepsim.losses.ncc import LocalNCCLoss
from deepsim.spatial import warp_onehot

__all__ = ["LabelOverlapLoss", "NCCSupLoss"]


class LabelOverlapLoss(nn.Module):
    """L(warp(onehot(moving_label), ddf), onehot(fixed_label)): the images are not compared at all.

    ``L`` is MONAI's soft ``DiceLoss`` over the foreground classes (``label_term="dice"``, default; in [0, 1]) or
    the mean squared difference of the one-hot maps over all classes (``"mse"``, as in the DeepSim authors' code).
    The one-hot map is warped bilinearly (:func:`deepsim.spatial.warp_onehot`), so the term has a gradient with
    respect to ``ddf``; a nearest-neighbour warp would have none. Label values (e.g. FreeSurfer 1002, 2035) become
    class indices through :class:`LabelIndexer`; 0 is background. Alone (``similarity: dice``) it is the loss
    SynthMorph trains with on synthetic images: the network must align anatomy whatever the contrast.

    Args:
        label_values: every label value of the dataset (a prepared datalist's ``label_values``).
        label_term: ``"dice"`` or ``"mse"``.
        label_downsample: integer factor f: the term is computed on a grid f times coarser — one-hots
            average-pooled to class fractions, the field average-pooled and divided by f (coarse voxels). With 83
            brain labels the full-resolution one-hot warp cost ~10x the rest of a CPU step; f = 2 cuts its voxels
            8x (3D). 1 is the full-resolution term.
    """

    needs_labels = True

    def __init__(self, label_values: Sequence[int], label_term: str = "dice", label_downsample: int = 2):
        super().__init__()
        if label_term not in ("dice", "mse"):
            raise ValueError(f"label_term must be 'dice' or 'mse', got {label_term!r}")
        if int(label_downsample) != label_downsample or label_downsample < 1:
            raise ValueError(f"label_downsample must be a positive integer, got {label_downsample}")
        self.label_downsample = int(label_downsample)
        self.indexer = LabelIndexer(label_values)
        self.label_term = label_term
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

    def overlap(self, moving_label: torch.Tensor, fixed_label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
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

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, *, ddf: torch.Tensor, moving_label: torch.Tensor,
                fixed_label: torch.Tensor) -> torch.Tensor:
        return self.overlap(moving_label, fixed_label, ddf)


class NCCSupLoss(nn.Module):
    """NCC+sup: local NCC of the images + ``label_weight`` x a label term, the paper's semi-supervised baseline.

        loss = LocalNCCLoss(warped, fixed) + label_weight * LabelOverlapLoss(ddf, moving_label, fixed_label)

    Args:
        label_values: every label value of the dataset (a prepared datalist's ``label_values``).
        spatial_dims: 2 or 3.
        window: local NCC window in voxels (9 in the paper).
        label_term, label_downsample: of the label term, see :class:`LabelOverlapLoss`.
        label_weight: weight of the label term (1 in the paper).
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
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}")
        self.ncc = LocalNCCLoss(spatial_dims, window)
        self.labels = LabelOverlapLoss(label_values, label_term, label_downsample)
        self.label_weight = float(label_weight)

    def label_loss(self, moving_label: torch.Tensor, fixed_label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """The label term alone (see :class:`LabelOverlapLoss`)."""
        return self.labels.overlap(moving_label, fixed_label, ddf)

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
