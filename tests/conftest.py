"""Fixtures shared by several test files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def deepsim_process(*args: str, umask: int | None = None, env: dict | None = None) -> subprocess.Popen:
    """``deepsim ARGS`` started as its own process (a fresh Python, as a user runs it), stdout and stderr piped."""
    return subprocess.Popen([sys.executable, "-m", "deepsim.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture(scope="session")
def two_runs_started_together(tmp_path_factory) -> dict:
    """Two ``deepsim run --profile quick --losses mse --seed 0 -q`` into one folder, started at the same moment with
    umask 027 (as a hostile user, or a careless job scheduler, would). Returns the folder and, per process, its
    exit status and stderr: ``{"out": Path, "runs": [(returncode, stderr), ...]}``.

    Shared by the tests of the run lock (one run wins, the other is refused in one line), of the tracking store
    (not broken by the race), of file modes (the umask is honoured) and of determinism (a later run with the same
    seed gives the same table)."""
    out = tmp_path_factory.mktemp("together") / "out"
    procs = [deepsim_process("run", "--profile", "quick", "--losses", "mse", "--seed", "0", "--out", str(out),
                             "--no-progress", "-q", umask=0o027) for _ in range(2)]
    runs = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        runs.append((proc.returncode, err))
    return {"out": Path(out), "runs": runs}
