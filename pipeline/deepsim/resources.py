"""Where the installed data packages live: the MONAI bundles (``deepsim.bundles``) and configs (``deepsim.configs``).

A floor-1 module: the losses (``DeepSimLoss.from_bundle``), the model resolution of ``deepsim register`` and the
workflows all find the bundles here, so none of them imports another to do it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from deepsim.errors import ConfigError

__all__ = ["bundle_dir", "package_path"]


def package_path(package: str, *parts: str) -> Path:
    """The installed path of ``parts`` inside ``package`` (the repository's folder in an editable install)."""
    return Path(str(resources.files(package).joinpath(*parts)))


def bundle_dir(name: str = "brain_mri") -> Path:
    """The installed copy of ``bundles/<name>`` (the repository's folder in an editable install)."""
    path = package_path("deepsim.bundles", name)
    if not (path / "configs" / "common.json").is_file():
        raise ConfigError(f"bundle {name!r} not found at {path}")
    return path
