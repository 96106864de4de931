"""Validation during registration training: mean Dice on a few validation pairs at every epoch end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from deepsim.engine import distributed
from deepsim.evaluation.dice import dice_per_label, mean_dice
from deepsim.evaluation.evaluate import register_pair

__all__ = ["ValidationDice"]


class ValidationDice:
    """Register ``num_pairs`` validation pairs with the network being trained; store ``val/dice`` in the metrics.

    The validation split monitors training; model selection on held-out subjects belongs to the λ sweep.
    Under DDP each rank registers its share of the pairs (pair ``i`` on rank ``i mod W``) and the Dice sums and
    counts are all-reduced, so ``val/dice`` is the mean over all ``num_pairs``; only the main process logs it.
    """

    def __init__(self, datalist_path: str | Path, num_pairs: int = 4, split: str = "validation",
                 log_fn: Callable[[dict, int], None] | None = None):
        self.datalist_path, self.num_pairs, self.split, self.log_fn = Path(datalist_path), num_pairs, split, log_fn
        self._pairs: list | None = None

    def attach(self, engine: Engine) -> None:
        if self.num_pairs > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _load(self) -> list:
        """This rank's validation pairs."""
        from deepsim.data.pairs import PairDataset

        dataset = PairDataset(self.datalist_path, self.split)
        n = min(self.num_pairs, len(dataset))
        return [dataset[i] for i in range(distributed.rank(), n, distributed.world_size())]

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if self._pairs is None:
            self._pairs = self._load()
        # the DDP wrapper's forward would synchronise buffers with ranks that may hold fewer pairs
        network, device = distributed.unwrap(engine.network), engine.state.device
        was_training = network.training
        network.eval()
        scores = []
        for pair in self._pairs:
            warped = register_pair(network, pair, device)["warped_label"]
            scores.append(mean_dice(dice_per_label(torch.as_tensor(pair["fixed_label"]).to(warped.device), warped[0])))
        network.train(was_training)
        total, count = distributed.all_reduce_sum([sum(scores), len(scores)])
        if not count:
            return
        metrics = {"val/dice": float(total / count)}
        engine.state.metrics.update(metrics)
        if self.log_fn is not None and distributed.is_main_process():
            self.log_fn(metrics, engine.state.epoch)
