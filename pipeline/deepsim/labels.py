"""Label values and class indices: a dataset's label values (e.g. FreeSurfer 1002, 2035) as contiguous classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LabelIndexer"]


class LabelIndexer(nn.Module):
    """Map arbitrary label values (e.g. FreeSurfer 1002, 2035) to contiguous class indices 0..K-1 and back."""

    def __init__(self, label_values: Sequence[int]):
        super().__init__()
        values = sorted({int(v) for v in label_values} | {0})
        self.register_buffer("values", torch.tensor(values, dtype=torch.long), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.values.numel())

    def to_index(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: integer tensor of label values -> same shape of indices; unknown values raise."""
        labels = labels.long()
        idx = torch.searchsorted(self.values.to(labels.device), labels)
        idx = idx.clamp(max=self.num_classes - 1)
        if not torch.equal(self.values.to(labels.device)[idx], labels):
            raise ValueError("label map holds values outside the dataset's label_values")
        return idx

    def to_value(self, index: torch.Tensor) -> torch.Tensor:
        return self.values.to(index.device)[index.long()]
