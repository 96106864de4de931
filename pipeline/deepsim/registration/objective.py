"""Registration objective: similarity(warped, fixed) + lambda * diffusion(ddf)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.losses import DiffusionLoss
from torch import nn

from deepsim.losses import FEATURE_NET_OF, build_similarity

__all__ = ["RegistrationObjective", "build_objective"]


class RegistrationObjective(nn.Module):
    """loss = similarity(warped, fixed) + weight * mean squared spatial gradient of ddf (voxels).

    forward(warped, fixed, ddf, moving_label=None, fixed_label=None) -> dict with ``loss``, ``similarity``,
    ``regularization`` (scalars). The label maps (B, 1, *S) are required, and handed on together with ``ddf``,
    only when the similarity declares ``needs_labels`` (``ncc-sup``); other similarities never see them.
    """

    def __init__(self, similarity: nn.Module, regularization_weight: float):
        super().__init__()
        if regularization_weight < 0:
            raise ValueError(f"regularization_weight must be >= 0, got {regularization_weight}")
        self.similarity = similarity
        self.regularization_weight = float(regularization_weight)
        self.diffusion = DiffusionLoss()

    @property
    def needs_labels(self) -> bool:
        """Whether forward needs ``moving_label`` and ``fixed_label``."""
        return bool(getattr(self.similarity, "needs_labels", False))

    def forward(
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        ddf: torch.Tensor,
        moving_label: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.needs_labels:
            if moving_label is None or fixed_label is None:
                raise ValueError(
                    f"similarity {type(self.similarity).__name__} needs moving_label and fixed_label; got "
                    f"moving_label={'None' if moving_label is None else 'a tensor'}, "
                    f"fixed_label={'None' if fixed_label is None else 'a tensor'}"
                )
            sim = self.similarity(warped, fixed, ddf=ddf, moving_label=moving_label, fixed_label=fixed_label)
        else:
            sim = self.similarity(warped, fixed)
        reg = self.diffusion(ddf)
        return {"loss": sim + self.regularization_weight * reg, "similarity": sim, "regularization": reg}


def build_objective(
    similarity: str,
    regularization_weight: float,
    spatial_dims: int = 3,
    models_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    label_values: Sequence[int] | None = None,
    **similarity_kwargs,
) -> RegistrationObjective:
    """Build the objective for similarity ``similarity``; DeepSim losses load ``<models_dir>/feature_<kind>.pt``.

    ``label_values`` (the dataset's, e.g. from :func:`deepsim.data.datasets.label_values`) is required by
    ``ncc-sup`` and ignored by the other similarities.
    """
    feature_net = None
    kind = FEATURE_NET_OF.get(similarity)
    if kind is not None:
        from deepsim.engine.checkpoints import feature_checkpoint_path, load_network

        if models_dir is None:
            raise ValueError(f"similarity {similarity!r} needs models_dir holding the pretrained feature net")
        feature_net = load_network(feature_checkpoint_path(models_dir, kind), map_location=device,
                                   builder="feature_net").to(device)
    sim = build_similarity(similarity, spatial_dims, feature_net=feature_net, label_values=label_values,
                           **similarity_kwargs)
    return RegistrationObjective(sim, regularization_weight).to(device)
