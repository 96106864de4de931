"""What one training iteration computes, per stage. Each task maps (network, batch, device) -> dict of scalars.

The trainer (:mod:`deepsim.engine.trainer`) is the same for every stage; only the task differs:

- :class:`RegistrationTask`: batch ``fixed``/``moving`` (B, 1, *S) -> warp -> similarity + lambda * diffusion.
- :class:`SegmentationTask`: batch ``image``/``label`` -> cross-entropy over contiguous class indices (DeepSim-seg).
- :class:`ReconstructionTask`: batch ``image`` -> mean squared reconstruction error (DeepSim-AE).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from torch import nn
from torch.nn import functional as F

from deepsim.labels import LabelIndexer
from deepsim.spatial import warp_image

__all__ = ["RegistrationTask", "SegmentationTask", "ReconstructionTask", "LabelIndexer"]


def _to(batch: Mapping, key: str, device: torch.device | str) -> torch.Tensor:
    """``batch[key]`` as a plain tensor on ``device``. A MONAI MetaTensor is unwrapped first: its metadata
    tracking would run on every operation of the network and the loss (the affine is not needed there)."""
    value = batch[key]
    if isinstance(value, MetaTensor):
        value = value.as_tensor()
    return torch.as_tensor(value).to(device, non_blocking=True)


class RegistrationTask:
    """loss of ``objective(warp(moving, net(moving, fixed)), fixed, ddf)``.

    If the objective ``needs_labels`` (NCC+sup), the batch's ``moving_label`` and ``fixed_label`` (B, 1, *S) are
    passed on as well. ``input_transform`` (e.g. :class:`deepsim.data.intensity.ContrastRandomization`) changes
    only what the network sees, each image drawn independently; the loss compares the clean images.
    """

    def __init__(self, objective: nn.Module, input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.objective = objective
        self.input_transform = input_transform

    def __call__(self, network: nn.Module, batch: Mapping, device) -> dict[str, torch.Tensor]:
        fixed, moving = _to(batch, "fixed", device).float(), _to(batch, "moving", device).float()
        if self.input_transform is not None:
            ddf = network(self.input_transform(moving), self.input_transform(fixed))
        else:
            ddf = network(moving, fixed)
        warped = warp_image(moving, ddf)
        if getattr(self.objective, "needs_labels", False):
            return self.objective(warped, fixed, ddf, moving_label=_to(batch, "moving_label", device),
                                  fixed_label=_to(batch, "fixed_label", device))
        return self.objective(warped, fixed, ddf)


class SegmentationTask:
    """Cross-entropy of the feature net's logits against the label map (values mapped to class indices).

    If the net predicts at a coarser grid than the labels (our segmenter predicts at 1/2), the class-index map is
    subsampled by nearest neighbour to the logits' grid.
    """

    def __init__(self, label_values: Sequence[int],
                 input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.indexer = LabelIndexer(label_values)
        self.input_transform = input_transform

    def __call__(self, network: nn.Module, batch: Mapping, device) -> dict[str, torch.Tensor]:
        image = _to(batch, "image", device).float()
        if self.input_transform is not None:
            image = self.input_transform(image)
        target = self.indexer.to_index(_to(batch, "label", device))
        logits = network(image)
        if logits.shape[2:] != target.shape[2:]:
            target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest").long()
        target = target[:, 0]
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(dim=1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}


class ReconstructionTask:
    """Mean squared error between the auto-encoder's reconstruction and its input."""

    def __call__(self, network: nn.Module, batch: Mapping, device) -> dict[str, torch.Tensor]:
        image = _to(batch, "image", device).float()
        return {"loss": F.mse_loss(network(image), image)}
