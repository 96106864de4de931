"""What a person sees on the terminal: log levels (``deepsim -q`` / ``-v``) and whether progress bars are drawn.

deepsim reports progress through the ``logging`` module (logger ``deepsim``), never with bare prints: results
(the table, written paths) go to stdout, everything else to stderr, so ``deepsim run > table.txt`` keeps only the
results. The command line calls :func:`configure` once; library users configure ``logging`` as they like.

Verbosity ``-1`` (``-q``): warnings and errors only, no progress bars. ``0`` (default): deepsim's stage messages.
``1`` (``-v``): also deepsim's debug messages and the INFO lines of MONAI's bundle runner and MLflow, which are
silenced otherwise (they were 16 of the 40 stdout lines of ``deepsim run --profile quick``).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure", "progress_enabled", "quiet_libraries", "LOGGER"]

LOGGER = "deepsim"
#: loggers of our dependencies that announce routine steps on every stage, and the level they get unless verbose:
#: MONAI's bundle runner warns that we pass no logging file (we configure logging here), MLflow announces its
#: database migrations at INFO
_CHATTY = {"monai.bundle": logging.ERROR, "monai.bundle.workflows": logging.ERROR,
           "monai.bundle.scripts": logging.ERROR, "mlflow": logging.WARNING}


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up at each record, so redirections and pytest's capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(verbosity: int = 0) -> None:
    """Set the ``deepsim`` logger's level and handler for ``verbosity`` (-1 quiet, 0 normal, 1 verbose)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[deepsim] %(message)s"))
    logger.addHandler(handler)  # records still propagate: handlers an application puts on the root see them too
    # MLflow sets its own logger's level when it is imported (later, lazily); its environment variable is what
    # that import reads. A level the user exported stays.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbosity > 0 else "WARNING")
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence the routine INFO/WARNING lines of MONAI's bundle runner and MLflow unless deepsim logs at DEBUG.

    MONAI creates its loggers with level INFO when ``monai.bundle`` is imported, so this runs again after that
    import (:func:`deepsim.workflow.run_stage`)."""
    verbose = logging.getLogger(LOGGER).getEffectiveLevel() <= logging.DEBUG
    for name, level in _CHATTY.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else level)


def progress_enabled(requested: bool = True) -> bool:
    """Progress bars only when asked for, not quieted (``-q``) and drawn on a terminal: tqdm's carriage-return
    redraws would otherwise fill a redirected log file with partial lines."""
    quiet = logging.getLogger(LOGGER).getEffectiveLevel() > logging.INFO
    return bool(requested) and not quiet and sys.stderr.isatty()
