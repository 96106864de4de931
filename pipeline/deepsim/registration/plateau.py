"""The stopping rule of the iterative stages (:mod:`.affine`, :mod:`.instance`): a level ends on a loss plateau."""

from __future__ import annotations

import math

__all__ = ["Plateau"]


class Plateau:
    """Called with each step's loss; True once the loss has not fallen below its best by ``tolerance`` for
    ``patience`` consecutive steps. ``relative``: the margin is ``tolerance`` × |best| (for losses of very different
    scales: local NCC ~0.5, mean squared errors of aligned images ~1e-4); otherwise ``tolerance`` itself."""

    def __init__(self, tolerance: float, patience: int, relative: bool = False):
        self.tolerance, self.patience, self.relative = tolerance, patience, relative
        self.best, self.since = math.inf, 0

    def __call__(self, value: float) -> bool:
        scale = (abs(self.best) if math.isfinite(self.best) else 0.0) if self.relative else 1.0
        if value < self.best - self.tolerance * scale:
            self.best, self.since = value, 0
        else:
            self.since += 1
        return self.since >= self.patience
