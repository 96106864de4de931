"""Resumable training: the whole training state, written atomically during training and restored on ``resume``.

:class:`TrainingState` is an ignite handler for the trainer of :func:`deepsim.engine.trainer.build_trainer`. It
writes ``models/<stage>.state.pt`` (beside the stage's checkpoint, see :func:`state_path`) every ``every``
iterations and at every epoch end, and once more, marked ``complete``, when training ends. The file holds

- the network and optimiser states (an LR scheduler or any other object with ``state_dict``/``load_state_dict``
  is saved too when the bundle lists it in ``stateful``; the bundles have no scheduler today),
- the engine's iteration (the epoch follows from it), the epoch metrics so far,
- every random generator: Python, NumPy, torch (CPU and each CUDA device), and those of ``stateful`` objects
  (the contrast randomisation's own generator, the partial epoch averages, the training time),
- where the data loader stands: the torch generator state when its current pass began and the batches drawn
  since, so a resumed loader replays exactly the same batches (shuffled or not) from the next one on.

With ``resume=True`` the handler restores all of it when the engine starts; the run then continues as if never
stopped: on CPU in deterministic mode the final weights equal those of an uninterrupted run
(``tests/test_reliability_resume.py``). A complete state ends training at once. Without ``resume`` a stale
state file is removed when training starts, so a later resume never picks up an older run.

The file is a plain dict loaded with ``torch.load(weights_only=True)``; only the main process writes it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, SequentialSampler, Subset

from deepsim.engine.checkpoints import describe_mismatch, load_failure, plain_values
from deepsim.engine.distributed import is_main_process, unwrap
from deepsim.errors import CheckpointError, ConfigError
from deepsim.io import atomic_write
from deepsim.tracking.active import active_run_id

__all__ = ["STATE_FORMAT", "ResumableLoader", "TrainingState", "get_rng_state", "load_state", "set_rng_state",
           "state_path"]

STATE_FORMAT = 1
_log = logging.getLogger(__name__)


def state_path(checkpoint: str | Path) -> Path:
    """Where the training state of the stage that writes ``checkpoint`` lives: ``x.pt`` -> ``x.state.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.state.pt")


def get_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states as values ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _skip(loader: Any, batches: int) -> Iterator:
    """An iterator over ``loader`` that starts after its first ``batches`` batches.

    A sequential map-style DataLoader (our registration stages: pair ``i`` depends on ``(seed, i)`` only) starts at
    the right index without loading the skipped items, and so does a loader with a ``skip(batches)`` method (the
    synthetic stream, :class:`deepsim.data.synthetic_stream.SyntheticStream`); any other loader is iterated and its
    batches dropped.
    """
    if hasattr(loader, "skip"):
        return iter(loader.skip(batches))
    if batches and isinstance(loader, DataLoader) and type(loader.sampler) is SequentialSampler \
            and loader.batch_size is not None:
        start = batches * loader.batch_size
        rest = Subset(loader.dataset, range(min(start, len(loader.dataset)), len(loader.dataset)))
        return iter(DataLoader(rest, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                               collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                               timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                               multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                               persistent_workers=loader.persistent_workers))
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
    return iterator


class ResumableLoader:
    """The trainer's data loader, wrapped to know where it stands so that a resumed run replays the same batches.

    Each pass (one ``iter()``) remembers the torch generator state it started from (a shuffling sampler draws its
    permutation from it) and counts the batches drawn. :meth:`resume_from` makes the next pass start from such a
    record: the same permutation, the drawn batches skipped, then every generator set to ``rng_after``.
    Other attributes (``dataset``, ``sampler``, ``batch_size``) are the wrapped loader's.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self._pass_rng: torch.Tensor | None = None
        self._drawn = 0
        self._replay: tuple[dict, dict] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        if self._replay is not None:
            (record, rng_after), self._replay = self._replay, None
            torch.set_rng_state(record["pass_rng"])
            iterator = _skip(self.loader, int(record["drawn"]))
            set_rng_state(rng_after)
            self._pass_rng, self._drawn = record["pass_rng"], int(record["drawn"])
        else:
            self._pass_rng, self._drawn = torch.get_rng_state(), 0
            iterator = iter(self.loader)
        return self._counted(iterator)

    def _counted(self, iterator: Iterator) -> Iterator:
        for batch in iterator:
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict:
        return {"pass_rng": self._pass_rng, "drawn": self._drawn}

    def resume_from(self, record: Mapping, rng_after: Mapping) -> None:
        """Make the next pass replay ``record`` (from :meth:`state_dict`), then restore ``rng_after``."""
        if record.get("pass_rng") is not None:
            self._replay = (dict(record), dict(rng_after))


def load_state(path: str | Path) -> dict:
    """Read a training-state file safely (``weights_only=True``); CheckpointError names the file and the problem."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"{path}: not a readable training state ({load_failure(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a deepsim training state (format {STATE_FORMAT} expected)")
    return payload


class TrainingState:
    """Save the training state every ``every`` iterations and at each epoch end; restore it when ``resume``.

    Args:
        checkpoint: the stage's checkpoint path (what :class:`~deepsim.engine.trainer.SaveNetwork` writes); the
            state goes to :func:`state_path` of it.
        every: iterations between two saves inside an epoch (epoch ends always save); ``0`` saves at epoch ends
            only. Default 20: a few milliseconds of writing per save at our model sizes.
        resume: continue from the state file if there is one (none: start from scratch, as a fresh run would).
        stateful: other objects whose ``state_dict()``/``load_state_dict()`` belong to the training state, by
            name (epoch averages, the contrast randomisation, a scheduler); ``None`` entries are skipped.
        fingerprint: settings that must be equal to resume (e.g. seed, loss, learning rate); a state saved with
            other values is refused with a ConfigError.
    """

    def __init__(self, checkpoint: str | Path, every: int = 20, resume: bool = False,
                 stateful: Mapping[str, Any] | None = None, fingerprint: Mapping[str, Any] | None = None):
        if every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {every}")
        self.path = state_path(checkpoint)
        self.every, self.resume = int(every), _flag(resume, "resume")
        self.stateful = {k: v for k, v in (stateful or {}).items() if v is not None}
        self.fingerprint = plain_values(dict(fingerprint or {}))
        self.loader: ResumableLoader | None = None
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        self.loader = engine.data_loader = ResumableLoader(engine.data_loader)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save, complete=True)

    def _iteration_completed(self, engine: Engine) -> None:
        it, length = engine.state.iteration, engine.state.epoch_length
        if self.every and it % self.every == 0 and (length is None or it % length != 0):
            self.save(engine)  # epoch ends save at EPOCH_COMPLETED, after validation and the epoch's logs

    def save(self, engine: Engine, complete: bool = False) -> None:
        if not is_main_process():
            return
        # a run stopped early (time limit, interruption) ends its engine too, but is not complete: resuming it continues
        planned = int(engine.state.max_epochs) * int(engine.state.epoch_length)
        payload = {
            "format": STATE_FORMAT,
            "complete": bool(complete) and int(engine.state.iteration) >= planned,
            "iteration": int(engine.state.iteration),
            "max_epochs": int(engine.state.max_epochs),
            "epoch_length": int(engine.state.epoch_length),
            "network": {k: v.detach().cpu() for k, v in unwrap(engine.network).state_dict().items()},
            "optimizer": engine.optimizer.state_dict(),
            "rng": get_rng_state(),
            "loader": self.loader.state_dict() if self.loader is not None else {},
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
            "metrics": {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
            "fingerprint": self.fingerprint,
            "mlflow_run_id": active_run_id(),
        }
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def _started(self, engine: Engine) -> None:
        if not self.resume:
            if is_main_process() and self.path.is_file():
                self.path.unlink()  # an older run's state must never be resumed into this one
            return
        if not self.path.is_file():
            _log.info("no training state at %s: training starts from the beginning", self.path)
            return
        self.restore(engine, load_state(self.path))

    def restore(self, engine: Engine, payload: Mapping) -> None:
        """Put ``payload`` (a state file's content) back into ``engine`` and the stateful objects."""
        self._check(engine, payload)
        try:
            unwrap(engine.network).load_state_dict(payload["network"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: the saved network does not match this stage's network "
                                  f"({describe_mismatch(unwrap(engine.network), payload['network'])})") from exc
        try:
            engine.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: the saved optimiser does not match this stage's ({exc})") from exc
        for name, obj in self.stateful.items():
            if name in payload["stateful"]:
                obj.load_state_dict(payload["stateful"][name])
        engine.state.metrics.update(payload["metrics"])
        iteration = int(payload["iteration"])
        engine.state.iteration, engine.state.epoch = iteration, iteration // int(payload["epoch_length"])
        self.resumed_from = iteration
        set_rng_state(payload["rng"])
        if self.loader is not None:
            self.loader.resume_from(payload["loader"], payload["rng"])
        if payload["complete"]:
            engine.terminate()  # training had finished: COMPLETED handlers save the restored network again
        _log.info("resumed %s at iteration %d", self.path, iteration)

    def _check(self, engine: Engine, payload: Mapping) -> None:
        ours = {"max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length, **self.fingerprint}
        saved = {"max_epochs": payload["max_epochs"], "epoch_length": payload["epoch_length"], **payload["fingerprint"]}
        differ = sorted(k for k in ours.keys() | saved.keys() if ours.get(k) != saved.get(k))
        if differ:
            what = ", ".join(f"{k} {saved.get(k)!r} (now {ours.get(k)!r})" for k in differ)
            raise ConfigError(f"{self.path}: saved by a run with other settings: {what}; resume with the same "
                              "settings or start again without resume")


def _flag(value: Any, name: str) -> bool:
    """A yes/no setting; ``python -m monai.bundle run --resume false`` passes the string "false" (fire)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{name} must be true or false, got {value!r}")
