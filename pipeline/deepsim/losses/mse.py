"""Mean squared intensity difference, the paper's MSE baseline (same-contrast images only)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MSELoss"]


class MSELoss(nn.Module):
    """Mean squared intensity difference. warped, fixed: (B, C, *S) -> scalar >= 0."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.mean((warped - fixed) ** 2)
