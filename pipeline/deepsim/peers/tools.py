"""What every peer wrapper shares: importing the optional tool with an install hint, and reporting its settings."""

from __future__ import annotations

import importlib
from dataclasses import asdict

from deepsim.errors import ConfigError

__all__ = ["EXTRA", "require", "tool_params"]

#: how to install every peer (the "compare" extra)
EXTRA = 'pip install antspyx==0.6.3 itk-elastix==0.25.4 fireants==1.5.0 SimpleITK (the "compare" extra)'


def require(module: str, package: str):
    """Import ``module`` or raise ConfigError naming the ``package`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{package} is not installed; the classical baselines need it: {EXTRA}") from exc


def tool_params(tool) -> dict:
    """A tool's settings for logs and reports: its dataclass fields but the name, tuples as lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(tool).items() if k != "name"}
