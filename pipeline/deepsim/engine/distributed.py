"""Data-parallel training under ``torchrun`` (PyTorch DistributedDataParallel); every function is single-process safe.

``torchrun --nproc_per_node=N`` starts N copies of a stage, each with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and
the rendezvous address in its environment. The bundles' ``multi_gpu_*.json`` configs turn a training stage into a
data-parallel one with the pieces here: :func:`init_from_env` (process group: NCCL on GPUs, gloo on CPUs),
:func:`local_device`, :class:`PassShuffledSampler` (each rank reads its own shard), :func:`wrap_ddp` (gradients
averaged over ranks in backward) and :func:`destroy`. Handlers reduce what they report with :func:`all_reduce_sum`,
and only the main process (rank 0) writes checkpoints, logs to MLflow and shows progress bars.

Outside a process group every function answers for a plain single process (rank 0 of 1) and changes nothing, so
stage code calls them unconditionally.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from deepsim.errors import ConfigError

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "is_distributed", "rank", "world_size", "is_main_process", "barrier", "launched_by_torchrun", "local_rank",
    "local_device", "init_from_env", "destroy", "wrap_ddp", "unwrap", "all_reduce_sum", "run_on_main",
    "PassShuffledSampler", "SyncedTimeLimit",
]

T = TypeVar("T")
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How many init_from_env calls hold the group that init_from_env created (0: none, or someone else's group).
# The CLI holds it for the whole pipeline while each stage's config takes and releases it in turn; re-creating a
# group under one torchrun rendezvous is not reliable, so it must outlive the stages.
_holds = 0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and talks to MLflow."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op outside a process group."""
    if is_distributed():
        dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether this process got the environment torchrun (or a compatible launcher) gives its workers."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process), else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 3600.0) -> torch.device:
    """Join the process group torchrun set up (``env://``) and return this rank's device (:func:`local_device`).

    ``backend``: ``"nccl"`` (default with CUDA; also selects ``cuda:LOCAL_RANK``) or ``"gloo"`` (default on CPU).
    ``timeout_s``: how long a collective waits for the other ranks. The default hour covers rank 0 preparing the
    data or evaluating while the other ranks wait at a barrier (NCCL's own default is 10 minutes).
    Calling it again while the group exists only takes one more hold on it (released by :func:`destroy`).
    """
    global _holds
    if dist.is_initialized():
        if _holds:  # our group: one more hold; someone else's group is left to them
            _holds += 1
        return local_device()
    if not launched_by_torchrun():
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        raise ConfigError(f"distributed training must be launched by torchrun (e.g. torchrun --nproc_per_node=2 ...);"
                          f" {', '.join(missing)} not set")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _holds = 1
    return local_device()


def destroy() -> None:
    """Release one hold taken by :func:`init_from_env`; the last one destroys the process group."""
    global _holds
    if _holds and dist.is_initialized():
        _holds -= 1
        if _holds == 0:
            dist.destroy_process_group()


def wrap_ddp(network: nn.Module, device: torch.device | str) -> nn.Module:
    """``network`` on ``device``, inside ``DistributedDataParallel`` when there are several ranks (else unchanged).

    DDP broadcasts rank 0's weights when it wraps, then averages the gradients over ranks in every backward, so
    N ranks with per-rank batch B step exactly like one process with batch N·B (every loss here is a batch mean).
    """
    device = torch.device(device)
    network = network.to(device)
    if not is_distributed():
        return network
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside a DDP wrapper (state-dict keys without ``module.``); other modules unchanged."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64), e.g. metric sums and counts; unchanged alone.

    Every rank must call it with the same number of values, at the same point of training.
    """
    if not is_distributed():
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only; its (picklable) result is handed to every rank, which wait for it.

    Used for work that writes shared files, e.g. preparing the dataset: the other ranks get its datalist path.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PassShuffledSampler(DistributedSampler):
    """``DistributedSampler`` over this process's ranks that draws a new order on every pass over the data.

    Rank ``r`` of ``W`` reads positions ``r, r + W, r + 2W, ...`` of the pass's order, so step ``s`` of the N
    ranks covers exactly the items one process with batch ``W`` would read at step ``s``. With ``shuffle=False``
    the order is ``0, 1, 2, ...`` (the registration pairs, already random draws from ``(seed, i)``); with
    ``shuffle=True`` pass ``k`` uses the permutation seeded by ``seed + k``, the same on every rank.

    Passes, not epochs, index the permutation: our stages run epochs of ``epoch_length`` steps that need not match
    one pass, and ignite re-iterates the loader whenever it runs out, so a ``set_epoch`` per epoch (what MONAI's
    trainer calls) would repeat one order within an epoch. ``set_epoch`` is therefore ignored.
    Outside a process group it is a plain sampler of one replica.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=int(seed),
                         drop_last=drop_last)
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: every pass (every ``iter()``) draws its own order; see the class docstring."""

    def __iter__(self):
        self.epoch = self.passes
        self.passes += 1
        return super().__iter__()

    def state_dict(self) -> dict:
        """The pass in progress, for a resumed run (``deepsim.engine.resume``) to replay its order."""
        return {"pass": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.passes = int(state["pass"])


class SyncedTimeLimit:
    """Stop training on every rank at the same iteration once any rank has run for ``limit_s`` seconds.

    ignite's ``TimeLimit`` decides per process; under DDP one rank stopping a step before the others would leave
    them waiting in their gradient all-reduce. One tiny all-reduce per iteration (only when time-limited and
    distributed) keeps the decision common.
    """

    def __init__(self, limit_s: float):
        if limit_s <= 0:
            raise ValueError(f"limit_s must be positive, got {limit_s}")
        self.limit_s = float(limit_s)
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        over = time.perf_counter() - self._start > self.limit_s
        if all_reduce_sum([float(over)])[0] > 0:
            engine.terminate()
