"""Start a training stage from a trained network (``registration_init``): fine-tuning instead of training anew.

Meant for the main job to fine-tune, with each loss on the user's data, a registration network pretrained on
synthetic label-driven pairs (:mod:`deepsim.workflows.pretrain`); null (training anew) in every shipped profile until
such a network good enough to ship exists. The stage builds its network from its own config as always;
:func:`warm_start` then loads the checkpoint's weights into it with ``strict=True``. A missing file, or a checkpoint
of another architecture, is refused in one line that names the file (and both architectures), before any step runs:
silently training a different network than the config says would make every number after it a lie.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from torch import nn

from deepsim.engine.checkpoints import BUILDERS, describe_mismatch, load_checkpoint, plain_values
from deepsim.errors import ConfigError

__all__ = ["architecture", "check_init", "warm_start"]

_log = logging.getLogger(__name__)


def architecture(builder: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full constructor call ``BUILDERS[builder](**kwargs)`` with defaults filled in, as plain values (two
    calls that differ only in spelling a default compare equal)."""
    bound = inspect.signature(BUILDERS[builder]).bind_partial(**kwargs)
    bound.apply_defaults()
    return plain_values(dict(bound.arguments))


def _call(builder: str, kwargs: dict[str, Any]) -> str:
    return f"{builder}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def check_init(checkpoint: str | Path, builder: str, kwargs: dict[str, Any], key: str = "registration_init") -> dict:
    """The checkpoint ``checkpoint`` read and checked against the network ``BUILDERS[builder](**kwargs)`` that a
    stage builds; returns its payload. ConfigError (one line, naming ``key``, the file and both architectures) when
    it is missing or holds another kind of network or other constructor arguments; CheckpointError when the file
    is no readable checkpoint. Cheap (no network is built): the main job calls it before anything runs."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{key} {path}: no such checkpoint file (set {key} to null to train from scratch)")
    payload = load_checkpoint(path)
    stored = payload["builder"]
    if stored != builder:
        raise ConfigError(f"{key} {path}: holds a {stored}, but this stage trains a {builder}")
    theirs, ours = architecture(stored, payload["kwargs"]), architecture(builder, kwargs)
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise ConfigError(f"{key} {path}: the checkpoint's network {_call(stored, {k: theirs.get(k) for k in differ})} "
                          f"differs from this stage's {_call(builder, {k: ours.get(k) for k in differ})}")
    return payload


def warm_start(network: nn.Module, checkpoint: str | Path | None, builder: str, kwargs: dict[str, Any],
               key: str = "registration_init") -> nn.Module:
    """``network`` (built as ``BUILDERS[builder](**kwargs)``) with the weights of ``checkpoint`` loaded with
    ``strict=True``; ``checkpoint`` None: ``network`` unchanged. Errors: see :func:`check_init`."""
    if checkpoint is None or checkpoint == "":
        return network
    payload = check_init(checkpoint, builder, kwargs, key)
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{key} {checkpoint}: its weights do not fit this stage's {builder} "
                          f"({describe_mismatch(network, payload['state_dict'])})") from exc
    _log.info("%s: weights of %s (%s)", key, checkpoint, payload.get("meta", {}).get("similarity", builder))
    return network
