"""Error types raised for problems a user can fix (bad files, bad configs, bad command-line values).

Each message is one line that names the offending file or option and the problem, e.g.
``DatasetError: /data/sub-03_T1w.nii.gz has 4 dimensions; expected a 3D volume``. The CLI prints
the message and exits with a non-zero status instead of a traceback:

- :data:`EXIT_USAGE` (2): the command line itself is wrong — an unknown flag, a value of the wrong form
  (``--spacing -1``, ``--device bogus``, ``--seed -1``); argparse's errors and :class:`UsageError`;
- :data:`EXIT_FAILURE` (1): everything else a user can fix — input files, profiles and other configs, checkpoints,
  output folders, tracking stores, devices that are not there (every other :class:`DeepsimError`);
- :data:`EXIT_INTERRUPTED` (130): Ctrl-C.
"""

from __future__ import annotations

__all__ = ["DeepsimError", "DatasetError", "ConfigError", "UsageError", "CheckpointError", "TrackingError",
           "OutputError", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "exit_code", "first_line"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DeepsimError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class DatasetError(DeepsimError):
    """An input image, label map or datalist is missing, unreadable or inconsistent."""


class ConfigError(DeepsimError):
    """A configuration value or command-line option is invalid."""


class UsageError(ConfigError):
    """A command-line value is invalid in itself (exit 2, like argparse's own errors)."""


class CheckpointError(DeepsimError):
    """A checkpoint is missing, corrupted or belongs to another architecture."""


class TrackingError(DeepsimError):
    """MLflow could not record something (an artifact upload failed after its retries); the local file remains."""


class OutputError(DeepsimError):
    """An output path cannot be written without harming something: a folder deepsim does not own, a file that is
    an input, a run already writing there, a folder that is not writable."""


def exit_code(error: DeepsimError) -> int:
    """The process exit status for ``error`` (see the module docstring)."""
    return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of another library's error message, cut at a word boundary (with "...") when longer than
    ``limit``: the part of a multi-line message that fits into our one-line errors, never cut mid-word."""
    line = (str(error).strip().splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(",;:") + " ..."
