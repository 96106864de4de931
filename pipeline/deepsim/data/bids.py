"""A study's T1-weighted images: read from a BIDS dataset or a CSV list, and a small BIDS dataset made for examples.

Reading uses ``bids2table`` (MIT; an index of a dataset as one Arrow table): it indexes only the subject folders
asked for, so a one-subject job (``--participant-label 07``) does not walk the whole study, and it adds ~2 MB to
our dependencies (pyarrow is MLflow's already); pybids 0.22 does the same through a SQLite index, at 2 s instead
of 0.4 s for 200 subjects and with seven more packages (measured here, docs/cohort.md). Both are imported only
when a dataset is read.

One :class:`CohortItem` per subject and session: its T1w image and, optionally, a label map in the subject's own
space (for Dice), found in a derivatives folder as ``sub-X[_ses-Y]_desc-<atlas>_dseg.nii.gz``. Where a session
holds several T1w images (runs, acquisitions), the first in path order is used and the others are named in a
warning.

:func:`make_example_dataset` writes a small BIDS dataset from the six embedded donor brains (``deepsim
cohort-example``): each subject a donor's Desikan-Killiany labels moved by a random smooth deformation and a
random head position, a T1-like image synthesised from them (:mod:`deepsim.data.synthesis`), its labels as
derivatives (``desc-dk`` and tissue classes ``desc-tissue``), and one donor left out as a template with its atlas.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepsim.errors import DatasetError

__all__ = ["CohortItem", "find_t1w", "read_subjects_csv", "make_example_dataset", "TISSUE_LABELS", "tissue_classes",
           "write_label_table", "read_label_table"]

#: tissue classes of the default atlas and of the example subjects (FSL FAST / ANTs Atropos order)
TISSUE_LABELS: dict[int, str] = {1: "CSF", 2: "GM", 3: "WM"}
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class CohortItem:
    """One T1w image of a study: ``subject`` and ``session`` labels (without ``sub-``/``ses-``), the image and an
    optional label map in the same space."""

    subject: str
    session: str | None
    t1w: Path
    labels: Path | None = None

    @property
    def prefix(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``: the start of every derivative's file name."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> Path:
        """``sub-X/[ses-Y/]anat``, relative to the derivatives root."""
        path = Path(f"sub-{self.subject}")
        return (path / f"ses-{self.session}" if self.session else path) / "anat"


def _check_label(value: str, what: str, where: str) -> str:
    value = value.removeprefix("sub-" if what == "subject" else "ses-")
    if not _LABEL.match(value):
        raise DatasetError(f"{where}: {what} label {value!r} is not a BIDS label (letters and digits only)")
    return value


def _index(root: Path, subjects: Sequence[str] | None):
    """bids2table's index of ``root`` (only the ``subjects`` folders when given) as a list of row dicts."""
    import logging

    import bids2table

    logging.getLogger("bids2table").setLevel(logging.ERROR)  # its "not a valid BIDS dataset" warning: ours instead
    include = [f"sub-{s}" for s in subjects] if subjects else None
    return bids2table.index_dataset(root, include_subjects=include).to_pylist()


def find_t1w(bids_dir: str | Path, participant_labels: Sequence[str] | None = None,
             labels_dir: str | Path | None = None, atlas: str | None = None) -> list[CohortItem]:
    """The T1w images (``anat/*_T1w.nii[.gz]``) of a BIDS dataset, one per subject and session, in label order.

    ``participant_labels``: only these subjects (with or without ``sub-``); a label with no folder is an error.
    ``labels_dir``: a derivatives dataset holding ``sub-X[_ses-Y]_desc-<atlas>_dseg.nii[.gz]`` per item, used for
    Dice (items without one have none). DatasetError names the folder when nothing is found."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise DatasetError(f"{bids_dir}: BIDS dataset folder not found")
    if not (bids_dir / "dataset_description.json").is_file():
        raise DatasetError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    wanted = [_check_label(s, "subject", "--participant-label") for s in participant_labels or []]
    missing = [s for s in wanted if not (bids_dir / f"sub-{s}").is_dir()]
    if missing:
        raise DatasetError(f"{bids_dir}: no folder for participant(s) {', '.join('sub-' + s for s in missing)}")
    rows = [r for r in _index(bids_dir, wanted) if r["suffix"] == "T1w" and r["datatype"] == "anat"
            and r["ext"] in (".nii", ".nii.gz")]
    found: dict[tuple[str, str | None], list[Path]] = {}
    for row in rows:
        found.setdefault((row["sub"], row["ses"]), []).append(Path(row["root"]) / row["path"])
    if not found:
        raise DatasetError(f"{bids_dir}: no T1w image (sub-*/[ses-*/]anat/*_T1w.nii[.gz])"
                           + (f" for participant(s) {', '.join(wanted)}" if wanted else ""))
    labels = _find_labels(Path(labels_dir), atlas, wanted) if labels_dir else {}
    items = []
    for (subject, session), paths in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        paths = sorted(paths)
        if len(paths) > 1:
            print(f"deepsim: warning: sub-{subject}" + (f" ses-{session}" if session else "")
                  + f" has {len(paths)} T1w images; using {paths[0].name}, not "
                  + ", ".join(p.name for p in paths[1:]), file=sys.stderr)
        items.append(CohortItem(subject, session, paths[0], labels.get((subject, session))))
    return items


def _find_labels(labels_dir: Path, atlas: str | None, subjects: Sequence[str]) -> dict:
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: labels folder not found")
    out = {}
    for row in _index(labels_dir, subjects):
        if (row["suffix"] == "dseg" and row["ext"] in (".nii", ".nii.gz") and not row["space"]
                and (atlas is None or row["desc"] == atlas)):
            out.setdefault((row["sub"], row["ses"]), Path(row["root"]) / row["path"])
    return out


def read_subjects_csv(path: str | Path) -> list[CohortItem]:
    """Items of a CSV with columns ``subject``, ``t1w`` and optionally ``session``, ``labels`` (paths relative to
    the CSV's folder). Every file is checked to exist, and every (subject, session) to appear once."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = {c.strip() for c in reader.fieldnames or []}
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc})") from exc
    if not {"subject", "t1w"} <= columns or columns - {"subject", "session", "t1w", "labels"}:
        raise DatasetError(f"{path}: columns must be subject, t1w[, session, labels]; got {sorted(columns)}")
    items, seen = [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{path}: line {line}"
        subject = _check_label(row["subject"], "subject", where)
        session = _check_label(row["session"], "session", where) if row.get("session") else None
        if (subject, session) in seen:
            raise DatasetError(f"{where}: sub-{subject}" + (f" ses-{session}" if session else "") + " listed twice")
        seen.add((subject, session))
        files = {}
        for key in ("t1w", "labels"):
            if row.get(key):
                file = Path(row[key]).expanduser()
                file = file if file.is_absolute() else path.parent / file
                if not file.is_file():
                    raise DatasetError(f"{where}: {key} {file} not found")
                files[key] = file
        if "t1w" not in files:
            raise DatasetError(f"{where}: no t1w image")
        items.append(CohortItem(subject, session, files["t1w"], files.get("labels")))
    if not items:
        raise DatasetError(f"{path}: lists no subjects")
    return items


def write_label_table(path: Path, names: dict[int, str]) -> Path:
    """A BIDS ``dseg.tsv``: columns ``index`` and ``name``, one row per label (background 0 left out)."""
    lines = ["index\tname"] + [f"{k}\t{v}" for k, v in sorted(names.items()) if k != 0]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_label_table(path: Path) -> dict[int, str]:
    """The ``index`` -> ``name`` map of a BIDS ``dseg.tsv``; DatasetError names the file when it is not one."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return {int(row["index"]): str(row["name"]) for row in rows}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: not a label table with columns index and name ({exc})") from exc


def tissue_classes(labels: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """CSF 1, GM 2, WM 3 (:data:`TISSUE_LABELS`) of a Desikan-Killiany label map, as the synthesis paints them:
    labelled voxels are grey matter, the rest of the brain mask white matter, its sulcal shell and rim CSF."""
    from deepsim.data.synthesis import brain_mask

    brain, csf = brain_mask(labels, spacing_mm)
    out = np.zeros(labels.shape, np.uint8)
    out[csf] = 1
    out[labels > 0] = 2
    out[brain & (labels == 0) & ~csf] = 3
    return out
