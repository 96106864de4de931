"""Fixtures shared by several test files, and the hypothesis profile every property test runs under."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests (hypothesis) draw the same examples on every run of a commit, so CI never fails at random on a
# newly found example (issue 24): profile "ci" derives each test's seed from the test itself (derandomize) and keeps
# no example database. `DEEPSIM_FUZZ=random` draws fresh examples instead (a failure prints the blob that replays
# it: pin it as an @example); `DEEPSIM_FUZZ_EXAMPLES=N` sets the number of examples per test (default 60).
# docs/reliability.md, "Property tests".
FUZZ_PROFILES = {"ci": {"derandomize": True}, "random": {"derandomize": False}}
_fuzz = os.environ.get("DEEPSIM_FUZZ", "ci")
if _fuzz not in FUZZ_PROFILES:
    raise pytest.UsageError(f"DEEPSIM_FUZZ={_fuzz!r}: expected one of {sorted(FUZZ_PROFILES)}")
try:
    _examples = int(os.environ.get("DEEPSIM_FUZZ_EXAMPLES", "60"))
except ValueError:
    _examples = 0
if _examples < 1:
    raise pytest.UsageError(f"DEEPSIM_FUZZ_EXAMPLES={os.environ['DEEPSIM_FUZZ_EXAMPLES']!r}: expected a positive "
                            "integer")
for _name, _options in FUZZ_PROFILES.items():
    settings.register_profile(_name, database=None, print_blob=True, deadline=None, max_examples=_examples,
                              **_options)
settings.load_profile(_fuzz)


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


@pytest.fixture(scope="module")
def quick_common(tmp_path_factory) -> dict:
    """Quick-profile overrides on a fresh output folder (one per test module), with the toy data prepared by the
    bundle's own stage."""
    from deepsim.workflow import load_profile, run_stage

    out = tmp_path_factory.mktemp("bundle")
    common = {**load_profile("quick").common, "output_dir": str(out), "progress": False}
    run_stage("preprocess", common)
    return common
