"""``--device`` values: parsed as torch parses them, and checked to exist on this machine before any work starts.

``parse_device("bogus")`` is a usage error (exit 2); ``check_available("cuda")`` on a machine without a GPU is a
one-line ConfigError (exit 1) naming what torch sees — instead of a failure deep inside checkpoint loading.
"""

from __future__ import annotations

from deepsim.errors import ConfigError, UsageError

__all__ = ["parse_device", "check_available"]

#: device types deepsim runs on; torch knows more (meta, xla, ...), which are no place to register images
_SUPPORTED = ("cpu", "cuda", "mps", "xpu")


def parse_device(text: str) -> str:
    """The canonical form of a torch device string (``"cuda:0"``, ``"cpu"``); UsageError for anything else."""
    import torch

    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {text!r}: not a torch device; use cpu, cuda, cuda:<index>, mps or xpu") from None
    if device.type not in _SUPPORTED:
        raise UsageError(f"--device {text!r}: deepsim runs on {', '.join(_SUPPORTED)} devices, not {device.type}")
    return str(device)


def check_available(text: str | None) -> None:
    """ConfigError unless the device ``text`` names (``None``: the default choice, always fine) exists here."""
    if text is None:
        return
    import torch

    device = torch.device(parse_device(text))
    if device.type == "cpu":
        return
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": None}[device.type]
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        available = backend is not None and backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        raise ConfigError(f"--device {text}: torch sees no {device.type.upper()} device on this machine "
                          f"(torch {torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text}: this machine has {count} {device.type.upper()} device(s), numbered "
                          f"0 to {count - 1}")
