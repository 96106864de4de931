"""A whole study in one call, both levels of ``deepsim cohort``: what the brain bundle's ``configs/cohort.json``
runs. Its own module because the group level (:mod:`.cohort_group`) already imports the participant level
(:mod:`.cohort`)."""

from __future__ import annotations

from pathlib import Path

from deepsim.errors import DatasetError
from deepsim.workflows.cohort import CohortSettings, run_cohort
from deepsim.workflows.cohort_group import run_group

__all__ = ["run_study"]


def run_study(bids_dir: str | Path, out_dir: str | Path, settings: CohortSettings,
              participant_labels: list[str] | None = None, tracking_uri: str | None = None,
              command: str = "python -m monai.bundle run --config_file configs/cohort.json") -> dict:
    """The participant level, then the group level on the same output folder. Every subject is attempted; if any
    failed, a DatasetError says how many once the group report (which lists them) is written. Returns
    :func:`~deepsim.workflows.cohort_group.run_group`'s result."""
    out_dir = Path(out_dir)
    run_cohort(Path(bids_dir), out_dir, settings, participant_labels)
    result = run_group(out_dir, tracking_uri, command)
    if result["failed"]:
        raise DatasetError(f"{len(result['failed'])} subject(s) failed; see {result['failures']}")
    return result
