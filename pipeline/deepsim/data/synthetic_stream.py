"""An endless, replayable stream of synthetic training batches for the engine (``pairs: synthetic``).

The training engine iterates a data loader; a synthetic source has no files to load: every batch is drawn on the
training device by a generator such as :class:`deepsim.data.synth.LabelPairSynth`. Batch ``i`` depends on
``(seed, i)`` only (its own ``torch.Generator``, seeded from both), so a run interrupted after ``n`` batches resumes
with batch ``n`` without drawing the ones before (:meth:`SyntheticStream.skip`, used by
:class:`deepsim.engine.resume.ResumableLoader`), and two runs with one seed see the same stream.

Views turn a pair batch into what a stage trains on: :func:`pair_view` for registration (``moving``, ``fixed``,
``moving_label``, ``fixed_label``), :func:`image_view` for the feature nets (``image``, ``label``: both images of
every pair, each its own contrast).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["SyntheticStream", "pair_view", "image_view", "VIEWS"]

Batch = dict[str, torch.Tensor]


def pair_view(batch: Mapping[str, torch.Tensor]) -> Batch:
    """Registration batches: the generator's pair as it is."""
    return {key: batch[key] for key in ("moving", "fixed", "moving_label", "fixed_label")}


def image_view(batch: Mapping[str, torch.Tensor]) -> Batch:
    """Feature-net batches: moving and fixed images of B pairs as 2B images with their labels."""
    return {"image": torch.cat([batch["moving"], batch["fixed"]]),
            "label": torch.cat([batch["moving_label"], batch["fixed_label"]])}


#: the views by name, for configs
VIEWS: dict[str, Callable[[Mapping[str, torch.Tensor]], Batch]] = {"pairs": pair_view, "images": image_view}


class SyntheticStream:
    """Endless iterable of ``view(make_batch(batch_size, generator_i))`` for i = 0, 1, 2, ...

    Args:
        make_batch: ``(batch_size, torch.Generator) -> dict of tensors``, e.g. a ``LabelPairSynth``.
        batch_size: pairs per batch.
        seed: the stream's seed; batch ``i`` draws from a generator seeded with ``seed * 1_000_003 + i``.
        device: where the generators live (the generator's device: ``cuda`` for a GPU bank).
        view: ``"pairs"`` or ``"images"`` (:data:`VIEWS`).
    """

    def __init__(self, make_batch: Callable[[int, torch.Generator], Mapping[str, torch.Tensor]], batch_size: int = 1,
                 seed: int = 0, device: torch.device | str = "cpu", view: str = "pairs"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if view not in VIEWS:
            raise ValueError(f"view must be one of {sorted(VIEWS)}, got {view!r}")
        self.make_batch, self.batch_size, self.seed = make_batch, int(batch_size), int(seed)
        self.device, self.view = torch.device(device), view

    def batch(self, index: int) -> Batch:
        """Batch ``index`` of the stream (the same tensors every time it is asked for)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + int(index))
        with torch.no_grad():
            return VIEWS[self.view](self.make_batch(self.batch_size, generator))

    def skip(self, batches: int) -> Iterator[Batch]:
        """The stream from batch ``batches`` on (a resumed run's next batch)."""
        index = int(batches)
        while True:
            yield self.batch(index)
            index += 1

    def __iter__(self) -> Iterator[Batch]:
        return self.skip(0)
