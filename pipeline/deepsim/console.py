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


def _ours(record: logging.LogRecord) -> bool:
    return record.name == LOGGER or record.name.startswith(LOGGER + ".")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up at each record, so redirections and pytest's capture work).

    Other libraries' records that reach the root logger are shown from ERROR up, or all with ``-v``: many log
    routine warnings (urllib3's connection retries) that used to go nowhere (they install a ``NullHandler``)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return (self.verbose or _ours(record) or record.levelno >= logging.ERROR) and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Format(logging.Formatter):
    """``[deepsim] message`` for our records, ``[logger] LEVEL: message`` for other libraries' warnings."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if _ours(record):
            return f"[deepsim] {message}"
        return f"[{record.name}] {record.levelname}: {message}"


def configure(verbosity: int = 0) -> None:
    """Configure logging for the command line (-1 quiet, 0 normal, 1 verbose): one stderr handler on the root
    logger, the ``deepsim`` logger's level, and the levels of MONAI's and MLflow's routine messages.

    The handler sits on the root logger, as an application's should: records keep propagating (pytest's caplog
    and other handlers see them), and a library that calls ``logging.basicConfig`` later (MLflow's PyTorch
    Lightning module does, on import) finds it configured and adds no second, duplicating handler."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler(verbose=verbosity > 0)
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.getLogger(LOGGER).setLevel(level)
    # MLflow sets its own logger's level when it is imported (later, lazily); its environment variables are what
    # that import and its downloads read. Values the user exported stay.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbosity > 0 else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(progress_enabled()).lower())
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
