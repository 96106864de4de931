"""Command-line conventions: --version, python -m deepsim, -q/-v through logging, progress bars only on a terminal,
help texts that list every choice."""

import io
import logging
import subprocess
import sys

import pytest

from deepsim import __version__, console
from deepsim.cli import LOSSES, build_parser, main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _default_verbosity():
    yield
    console.configure(0)


def test_python_dash_m_deepsim_prints_the_version():
    proc = subprocess.run([sys.executable, "-m", "deepsim", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"deepsim {__version__}"


def test_help_lists_every_similarity_loss(monkeypatch):
    from deepsim.losses import SIMILARITY_NAMES

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps long lines at hyphens ("deepsim-" / "ae")
    assert set(LOSSES) == set(SIMILARITY_NAMES)
    for command in ("run", "sweep", "register"):
        text = " ".join(build_parser()._subparsers._group_actions[0].choices[command].format_help().split())
        assert all(loss in text for loss in LOSSES), command


@pytest.mark.parametrize("argv, verbosity", [(["bundle-path"], 0), (["-q", "bundle-path"], -1),
                                             (["bundle-path", "-q"], -1), (["bundle-path", "--verbose"], 1)])
def test_quiet_and_verbose_work_before_and_after_the_command(argv, verbosity):
    assert build_parser().parse_args(argv).verbosity == verbosity


def test_messages_go_to_stderr_with_their_level_and_results_to_stdout(capsys):
    log = logging.getLogger("deepsim.workflow")
    console.configure(0)
    log.info("stage message")
    log.debug("debug detail")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[deepsim] stage message\n"
    logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")  # routine noise
    logging.getLogger("somelib").error("broken")
    assert capsys.readouterr().err == "[somelib] ERROR: broken\n"
    console.configure(-1)
    log.info("hidden")
    log.warning("kept")
    assert capsys.readouterr().err == "[deepsim] kept\n"
    console.configure(1)
    log.debug("debug detail")
    assert "debug detail" in capsys.readouterr().err
    assert main(["-q", "bundle-path", "cells_2d"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("cells_2d") and captured.err == ""


def test_monai_and_mlflow_routine_lines_are_silenced_unless_verbose():
    import monai.bundle  # noqa: F401  (creates MONAI's loggers at INFO)

    console.configure(0)
    assert logging.getLogger("monai.bundle.workflows").getEffectiveLevel() > logging.WARNING
    assert logging.getLogger("mlflow").getEffectiveLevel() >= logging.WARNING
    console.configure(1)
    assert logging.getLogger("monai.bundle.workflows").getEffectiveLevel() == logging.INFO


def test_progress_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    console.configure(0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not console.progress_enabled(True)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert console.progress_enabled(True) and not console.progress_enabled(False)
    console.configure(-1)
    assert not console.progress_enabled(True)


def test_the_cli_turns_bars_off_when_stderr_is_redirected(monkeypatch):
    seen = {}
    monkeypatch.setattr("deepsim.cli._register", lambda args: seen.setdefault("no_progress", args.no_progress) and 0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    main(["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o"])
    assert seen["no_progress"] is True
