"""The one training engine of deepsim: MONAI's ``SupervisedTrainer`` driven by a task (see :mod:`.tasks`).

Every stage (auto-encoder and segmentation pretraining, registration with any loss) trains through
:func:`build_trainer`; bundles instantiate it from JSON and the ``deepsim`` CLI runs those same bundle configs.
The iteration fires MONAI's ``IterationEvents`` so MONAI/ignite handlers attach as usual.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from deepsim.engine import distributed
from deepsim.engine.checkpoints import save_checkpoint

__all__ = ["TaskIteration", "build_trainer", "EpochAverages", "SaveNetwork", "ProgressBar", "seed_everything",
           "autocast", "PRECISIONS", "speed_up"]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``) and choose cuDNN's mode.

    ``deterministic=True`` (default) makes cuDNN use deterministic algorithms: repeatable GPU runs. ``False``
    lets cuDNN autotune instead; on an H200 that did not speed up a registration training step (11.0 vs 12.0 ms at
    80×96×80 with the half-resolution U-Net, 61.1 vs 58.9 ms at 160×192×160 full resolution, medians of 15 steps,
    ``benchmarks/determinism_step_time.py``), so repeatability costs nothing measurable here. CPU runs are
    deterministic either way.
    """
    import torch
    from monai.utils import set_determinism

    set_determinism(seed=int(seed))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


PRECISIONS = ("fp32", "bf16")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The autocast context of ``precision``: bf16 on CUDA for "bf16", plain fp32 otherwise (CPU ignores "bf16").

    Under bf16 the convolutions run in bfloat16; what needs float32 asks for it (the flow head, warping, local NCC,
    cosine similarities: see :class:`~deepsim.registration.network.RegistrationNet` and
    :mod:`deepsim.losses`).
    """
    _check_precision(precision)
    device = torch.device(device)
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class TaskIteration:
    """``iteration_update`` for SupervisedTrainer: forward the task, backward, step (with gradient accumulation).

    ``precision="bf16"`` runs the task under bf16 autocast on CUDA (see :func:`autocast`); no loss scaling is needed
    with bfloat16's float32 exponent range.

    ``engine.state.output`` is ``[{"loss": float, ...}]``: MONAI's decollated form, a list of dicts, so MONAI's
    handlers read it with their usual ``from_engine(["loss"], first=True)`` (e.g. the ``MLFlowHandler`` that
    ``python -m monai.bundle run ... --tracking mlflow`` adds; a plain dict made it log a tuple and crash).
    """

    def __init__(self, task: Callable[[nn.Module, Mapping, torch.device], dict], accumulation_steps: int = 1,
                 precision: str = "fp32"):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        _check_precision(precision)  # at construction, not at the first step
        self.task = task
        self.accumulation_steps = accumulation_steps
        self.precision = precision

    def __call__(self, engine: SupervisedTrainer, batch: Mapping) -> list[dict[str, float]]:
        engine.network.train()
        step = engine.state.iteration - 1
        if step % self.accumulation_steps == 0:
            engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, self.precision):
            out = self.task(engine.network, batch, engine.state.device)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (out["loss"] / self.accumulation_steps).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if (step + 1) % self.accumulation_steps == 0:
            engine.optimizer.step()
        # one device-to-host read for all scalars (each float() would wait for the device separately)
        values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in out.values()]).tolist()
        result = dict(zip(out, values))
        if not all(map(math.isfinite, values)):
            raise FloatingPointError(f"non-finite training values at iteration {engine.state.iteration}: {result}")
        engine.state.output = [result]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class EpochAverages:
    """Average each scalar of the iteration output over an epoch into ``engine.state.metrics['train/<name>']``.

    ``log_fn(metrics: dict[str, float], epoch: int)`` is called at every epoch end (e.g. MLflow logging), on the
    main process only. Under DDP the averages are over every rank's steps (sums and counts all-reduced), so they
    equal a one-process run's with the global batch; ``seconds_per_step`` stays the main process's own.
    """

    def __init__(self, log_fn: Callable[[dict, int], None] | None = None, prefix: str = "train/"):
        self.log_fn = log_fn
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._start = 0.0
        self._resumed: tuple[dict, int, float] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._count = 0
        self._start = time.perf_counter()
        if self._resumed is not None:  # the epoch a resumed run continues: its averages so far
            (sums, count, elapsed), self._resumed = self._resumed, None
            self._sums.update(sums)
            self._count = count
            self._start -= elapsed

    def state_dict(self) -> dict:
        """The running sums of the epoch in progress (see :class:`deepsim.engine.resume.TrainingState`)."""
        return {"sums": dict(self._sums), "count": self._count, "elapsed_s": time.perf_counter() - self._start}

    def load_state_dict(self, state: dict) -> None:
        """Continue the interrupted epoch's averages when it starts again. Under DDP only the main process saved
        them, so the other ranks start the epoch's sums afresh."""
        if distributed.is_main_process():
            self._resumed = (dict(state["sums"]), int(state["count"]), float(state["elapsed_s"]))

    def _accumulate(self, engine: Engine) -> None:
        for k, v in engine.state.output[0].items():
            self._sums[k] += v
        self._count += 1

    def _complete(self, engine: Engine) -> None:
        keys = sorted(self._sums)  # the same order on every rank
        *sums, count = distributed.all_reduce_sum([self._sums[k] for k in keys] + [self._count])
        metrics = {f"{self.prefix}{k}": v / max(count, 1) for k, v in zip(keys, sums)}
        metrics[f"{self.prefix}seconds_per_step"] = (time.perf_counter() - self._start) / max(self._count, 1)
        engine.state.metrics.update(metrics)
        if self.log_fn is not None and distributed.is_main_process():
            self.log_fn(metrics, engine.state.epoch)


class SaveNetwork:
    """Save the trained network (with its constructor call) at the end of training, atomically.

    Under DDP only the main process writes (the plain network, no ``module.`` prefix); every rank then waits until
    the file exists, so a following stage can read it on any rank.
    """

    def __init__(self, path: str | Path, builder: str, kwargs: dict, meta: dict | None = None):
        self.path, self.builder, self.kwargs, self.meta = Path(path), builder, dict(kwargs), dict(meta or {})
        self._start = 0.0
        self._earlier_s = 0.0  # training time before a resume

    def state_dict(self) -> dict:
        return {"train_time_s": self._earlier_s + time.perf_counter() - self._start}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run: its training time counts from the interrupted run's (``train_time_s`` in the meta)."""
        self._earlier_s = float(state["train_time_s"])
        self._start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        meta = {**self.meta, "iterations": engine.state.iteration, "epochs": engine.state.epoch,
                "train_time_s": self._earlier_s + time.perf_counter() - self._start,
                **{k: float(v) for k, v in engine.state.metrics.items()}}
        if distributed.is_main_process():
            save_checkpoint(self.path, engine.network, self.builder, self.kwargs, meta)
        distributed.barrier()


class ProgressBar:
    """tqdm progress bar over all iterations, showing the latest loss. Disabled with ``enabled=False`` and on
    every rank but the main process."""

    def __init__(self, description: str, enabled: bool = True):
        self.description, self.enabled = description, enabled
        self._bar = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled or not distributed.is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    def _open(self, engine: Engine) -> None:
        from tqdm.auto import tqdm

        total = (engine.state.epoch_length or 0) * engine.state.max_epochs
        self._bar = tqdm(total=total or None, desc=self.description, unit="step", dynamic_ncols=True)

    def _update(self, engine: Engine) -> None:
        self._bar.set_postfix(loss=f"{engine.state.output[0]['loss']:.4f}", refresh=False)
        self._bar.update(engine.state.iteration - self._bar.n)  # a resumed run starts at its iteration

    def _close(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()

    def _close_on_error(self, engine: Engine, exc: BaseException) -> None:
        self._close(engine)
        raise exc


def speed_up(network: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Apply the GPU speed-ups that change a network in place, before it is wrapped for DDP or trained.

    ``channels_last``: store conv weights channels-last (NDHWC), the layout of cuDNN's fastest bf16 kernels.
    ``compile``: ``torch.compile`` the module in place (``nn.Module.compile``: state-dict keys are unchanged, so
    checkpoints stay plain). Both default off; ``benchmarks/speed.py`` measures them on a GPU (results in
    ``benchmarks/results/speed_gpu.md``)."""
    if channels_last:
        three_d = any(p.ndim == 5 for p in network.parameters())
        network = network.to(memory_format=torch.channels_last_3d if three_d else torch.channels_last)
    if compile:
        network.compile()
    return network


def build_trainer(
    network: nn.Module,
    task: Callable,
    train_loader: Iterable,
    max_epochs: int,
    learning_rate: float = 1e-3,
    epoch_length: int | None = None,
    device: torch.device | str = "cpu",
    accumulation_steps: int = 1,
    handlers: Sequence = (),
    time_limit_s: float | None = None,
    precision: str = "fp32",
) -> SupervisedTrainer:
    """A ``SupervisedTrainer`` whose iteration runs ``task`` with Adam; handlers with ``.attach`` are attached.

    ``precision``: "fp32" or "bf16" (autocast on CUDA, see :func:`autocast`; the CPU always runs fp32).

    ``time_limit_s``: stop after this many seconds of wall time (checked after every iteration, ignite's
    ``TimeLimit``; under DDP every rank stops at the same iteration); the run then ends normally, so handlers on
    COMPLETED still save the network.

    Data-parallel training (``torchrun``) passes a network wrapped by :func:`deepsim.engine.distributed.wrap_ddp`
    and a loader over a :class:`~deepsim.engine.distributed.PassShuffledSampler`; see the bundles'
    ``multi_gpu_*.json``.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    device = torch.device(device)
    network = network.to(device)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=learning_rate)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=task,  # stored by MONAI only; the task computes the loss inside TaskIteration
        iteration_update=TaskIteration(task, accumulation_steps, precision),
        decollate=False,
    )
    for handler in handlers:
        handler.attach(trainer)
    if time_limit_s is not None:
        if time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
        limit = distributed.SyncedTimeLimit(time_limit_s) if distributed.is_distributed() \
            else TimeLimit(max(1, int(time_limit_s)))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, limit)
    return trainer
