"""Error types raised for problems a user can fix (bad files, bad configs).

Each message is one line that names the offending file or option and the problem, e.g.
``DatasetError: /data/sub-03_T1w.nii.gz has 4 dimensions; expected a 3D volume``. The CLI prints
the message and exits with a non-zero status instead of a traceback.
"""

from __future__ import annotations

__all__ = ["DeepsimError", "DatasetError", "ConfigError", "CheckpointError", "TrackingError"]


class DeepsimError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class DatasetError(DeepsimError):
    """An input image, label map or datalist is missing, unreadable or inconsistent."""


class ConfigError(DeepsimError):
    """A configuration value or command-line option is invalid."""


class CheckpointError(DeepsimError):
    """A checkpoint is missing, corrupted or belongs to another architecture."""


class TrackingError(DeepsimError):
    """MLflow could not record something (an artifact upload failed after its retries); the local file remains."""
