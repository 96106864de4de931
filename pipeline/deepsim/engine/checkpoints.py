"""Checkpoints: weights saved with the constructor call beside them, written atomically, loaded safely.

A checkpoint file is a plain dict ``{"format": 1, "builder": str, "kwargs": dict, "state_dict": ..., "meta": dict}``
saved with ``torch.save``. Loading uses ``torch.load(weights_only=True)`` (no pickled code runs) and accepts only
builders from :data:`BUILDERS`; the state dict is loaded with ``strict=True``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsim.engine.distributed import unwrap
from deepsim.errors import CheckpointError, first_line
from deepsim.io import atomic_write
from deepsim.features.networks import build_feature_net
from deepsim.registration.network import RegistrationNet

__all__ = ["BUILDERS", "build_network", "save_checkpoint", "load_checkpoint", "load_network", "feature_checkpoint_path",
           "registration_checkpoint_path", "describe_mismatch", "plain_values"]

BUILDERS: dict[str, Any] = {
    "feature_net": build_feature_net,
    "registration_net": RegistrationNet,
}


def feature_checkpoint_path(models_dir: str | Path, kind: str) -> Path:
    """Where the feature pretraining stage writes (and registration reads) the ``kind`` ("ae"/"seg") net."""
    return Path(models_dir) / f"feature_{kind}.pt"


def registration_checkpoint_path(models_dir: str | Path, similarity: str) -> Path:
    """Where registration training with ``similarity`` writes its network."""
    return Path(models_dir) / f"registration_{similarity}.pt"


def plain_values(value: Any) -> Any:
    """Reduce a value to what ``torch.load(weights_only=True)`` accepts and JSON holds: numbers, strings, lists,
    dicts (0-d tensors and NumPy scalars become numbers, anything else its string). The same value survives a
    save/load round trip, so settings stored this way compare equal to freshly reduced ones."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


def save_checkpoint(path: str | Path, network: nn.Module, builder: str, kwargs: dict, meta: dict | None = None) -> Path:
    """Save ``network``'s weights with the call ``BUILDERS[builder](**kwargs)`` that rebuilds it.

    A ``DistributedDataParallel`` wrapper is unwrapped first, so the keys never carry its ``module.`` prefix.
    """
    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; expected one of {sorted(BUILDERS)}")
    state = {k: v.detach().cpu() for k, v in unwrap(network).state_dict().items()}
    payload = {"format": 1, "builder": builder, "kwargs": plain_values(dict(kwargs)),
               "state_dict": state, "meta": plain_values(dict(meta or {}))}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict safely; CheckpointError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the stage that trains it first)")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"{path}: not a deepsim checkpoint: {_what_file(path)}, not a file written by "
                              "torch.save (a checkpoint is registration_<loss>.pt or feature_<kind>.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"{path}: not a readable deepsim checkpoint ({load_failure(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != 1 or payload.get("builder") not in BUILDERS:
        raise CheckpointError(f"{path}: not a deepsim checkpoint (missing format/builder fields)")
    return payload


def _what_file(path: Path) -> str:
    """A few words on what a file that is not a zip archive looks like (its first bytes)."""
    head = path.read_bytes()[:352] if path.stat().st_size else b""
    if not head:
        return "an empty file"
    if head[:2] == b"\x1f\x8b":
        return "a gzip file (a .nii.gz image?)"
    nifti1 = int.from_bytes(head[:4], "little") == 348 and head[344:347] in (b"n+1", b"ni1")
    nifti2 = int.from_bytes(head[:4], "little") == 540 and head[4:7] in (b"n+2", b"ni2")
    if nifti1 or nifti2:
        return "a NIfTI image"
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "a plain pickle (not torch's zip format: truncated, or from a very old torch)"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head[:64]):
        return "a text file"
    return "a truncated or unknown file (no zip archive inside)"


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words (torch's own message runs over many lines)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return "it holds pickled Python objects, which are never loaded: torch.load(weights_only=True)"
    return f"{type(exc).__name__}: {first_line(exc, 160)}"


def build_network(builder: str, kwargs: dict) -> nn.Module:
    """Construct ``BUILDERS[builder](**kwargs)``: the one way bundles and checkpoints create networks."""
    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[builder](**kwargs)


def describe_mismatch(network: nn.Module, state: dict) -> str:
    """What differs between ``network``'s parameters and a state dict: missing, unexpected and reshaped tensors."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first {k}: {tuple(state[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the network)")
    return "; ".join(parts) or "no difference in names or shapes"


def load_network(path: str | Path, map_location: str | torch.device = "cpu", builder: str | None = None) -> nn.Module:
    """Rebuild the network stored in ``path`` and load its weights with ``strict=True``.

    ``builder``: the kind the caller needs (``"feature_net"``, ``"registration_net"``); a checkpoint of another kind
    is a CheckpointError naming both.
    """
    payload = load_checkpoint(path, map_location)
    if builder is not None and payload["builder"] != builder:
        raise CheckpointError(f"{path}: a {payload['builder']} checkpoint, but a {builder} is needed here")
    try:
        network = build_network(payload["builder"], payload["kwargs"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its {payload['builder']} from the stored arguments "
                              f"({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored architecture "
                              f"({describe_mismatch(network, payload['state_dict'])})") from exc
    return network
