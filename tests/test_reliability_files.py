"""Reliability: deepsim never deletes or overwrites a file it did not write, one process writes into a folder at a
time, a shared tracking store survives runs started together, results are readable as the umask says, and the same
seed gives the same table. Each test does what a user (careless or hostile) would do on the command line."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import deepsim_process
from deepsim.cli import main
from deepsim.output_folder import LOCK, MARKER, own_output_folder

sys.path.insert(0, str(Path(__file__).parent))
from test_register import _save_model  # noqa: E402  (the untrained registration model of the register tests)

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _image(path: Path, seed: int = 0, shape=(12, 12, 12)) -> Path:
    rng = np.random.default_rng(seed)
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model") / "registration_mse.pt")


def _one_error_line(capsys, kind: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deepsim: error: {kind}: "), err
    return err


# --------------------------------------------------------------------- 1. the main job and the user's project folder
def test_run_into_a_project_folder_holding_user_data_is_refused_and_deletes_nothing(tmp_path, capsys):
    """Issue 21.1: `mkdir -p proj/data; cp F proj/data/sub-01_T1w.nii.gz; deepsim run --out proj` deleted the file.
    Now: exit 1, one line, every byte of the project as before; with --overwrite too (data/ is never replaced)."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    _image(proj / "data" / "sub-01_T1w.nii.gz")
    before = _digest(proj)
    assert main(["run", "--profile", "quick", "--out", str(proj), "--no-progress"]) == 1
    assert "is not empty and was not created by deepsim (it holds data)" in _one_error_line(capsys, "OutputError")
    assert main(["run", "--profile", "quick", "--out", str(proj), "--no-progress", "--overwrite"]) == 1
    err = _one_error_line(capsys, "OutputError")
    assert f"{proj / 'data'} holds files deepsim did not write (sub-01_T1w.nii.gz)" in err
    assert _digest(proj) == before and sorted(p.name for p in proj.rglob("*")) == ["data", "sub-01_T1w.nii.gz"]


def test_a_profile_dataset_inside_the_output_folder_is_refused_and_the_originals_stay_untouched(tmp_path, capsys):
    """Issue 21.1: with the profile's `dataset` pointing at <out>/data every original image was replaced by its
    preprocessed version. Now refused before anything is written."""
    from test_reliability_inputs import _subjects

    proj = tmp_path / "proj"
    _subjects(proj / "data")
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    profile["common"]["dataset"] = str(proj / "data")
    (tmp_path / "mine.json").write_text(json.dumps(profile))
    before = _digest(proj)
    for extra in ([], ["--overwrite"]):
        assert main(["run", "--profile", str(tmp_path / "mine.json"), "--out", str(proj), "--no-progress",
                     *extra]) == 1
        assert f"the profile's dataset {proj / 'data'} lies in {proj / 'data'}" in _one_error_line(capsys,
                                                                                                  "OutputError")
    assert _digest(proj) == before


# --------------------------------------------------------------------------- 5. register and warp outputs
def _register(fixed: Path, moving: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model),
                 "--out", str(out), "--no-progress", *extra])


def test_register_into_a_folder_deepsim_did_not_create_is_refused_and_overwrite_keeps_other_files(tmp_path, model,
                                                                                                   capsys):
    fixed, moving = _image(tmp_path / "f.nii.gz"), _image(tmp_path / "m.nii.gz", 1)
    out = tmp_path / "reg"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "warped.nii.gz").write_text("my own file of that name")
    assert _register(fixed, moving, out, model) == 1
    assert "is not empty and was not created by deepsim" in _one_error_line(capsys, "OutputError")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "warped.nii.gz"]
    assert (out / "warped.nii.gz").read_text() == "my own file of that name"
    assert _register(fixed, moving, out, model, "--overwrite") == 0  # the user asked for it: outputs replace
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "my notes" and nib.load(out / "warped.nii.gz").shape == (12, 12, 12)


def test_register_with_a_folder_in_the_place_of_an_output_moves_nothing_in(tmp_path, model, capsys):
    """Issue 21.5: with reg/registration.json a folder, `register --out reg` moved three outputs in, then crashed."""
    fixed, moving = _image(tmp_path / "f.nii.gz"), _image(tmp_path / "m.nii.gz", 1)
    out = tmp_path / "reg"
    assert _register(fixed, moving, out, model) == 0  # deepsim's folder now
    capsys.readouterr()
    before = _digest(out)
    (out / "registration.json").unlink()
    (out / "registration.json").mkdir()
    for extra in ([], ["--overwrite"]):
        assert _register(fixed, moving, out, model, *extra) == 1
        assert f"{out / 'registration.json'} is a folder" in _one_error_line(capsys, "OutputError")
    after = _digest(out)
    assert after == {k: v for k, v in before.items() if k != "registration.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".reg")]  # no staging folder left


def test_register_again_into_its_own_folder_replaces_its_outputs_and_keeps_the_users_files(tmp_path, model, capsys):
    fixed, moving = _image(tmp_path / "f.nii.gz"), _image(tmp_path / "m.nii.gz", 1)
    out = tmp_path / "reg"
    assert _register(fixed, moving, out, model) == 0
    (out / "notes.txt").write_text("added later by the user")
    assert _register(moving, fixed, out, model) == 0
    assert json.loads((out / "registration.json").read_text())["fixed"] == str(moving)
    assert (out / "notes.txt").read_text() == "added later by the user"
    capsys.readouterr()


def test_register_never_writes_over_its_own_inputs(tmp_path, model, capsys):
    """The fixed image named warped.nii.gz inside --out: refused even with --overwrite; the input is unchanged."""
    out = tmp_path / "reg"
    out.mkdir()
    fixed = _image(out / "warped.nii.gz")
    moving = _image(tmp_path / "m.nii.gz", 1)
    before = _digest(out)
    assert _register(fixed, moving, out, model, "--overwrite") == 1
    assert "is one of this command's inputs" in _one_error_line(capsys, "OutputError")
    assert _digest(out) == before


def test_warp_never_overwrites_its_inputs_and_replaces_a_file_only_with_overwrite(tmp_path, model, capsys):
    """Issue 21.5: `warp --out` equal to `--image` overwrote the input."""
    fixed, moving = _image(tmp_path / "f.nii.gz"), _image(tmp_path / "m.nii.gz", 1)
    assert _register(fixed, moving, tmp_path / "reg", model) == 0
    field = tmp_path / "reg" / "ddf_mm.nii.gz"
    capsys.readouterr()
    before = _digest(tmp_path)
    for out, extra in ((moving, []), (moving, ["--overwrite"]), (field, ["--overwrite"])):
        assert main(["warp", "--field", str(field), "--image", str(moving), "--out", str(out), *extra]) == 1
        assert "is one of this command's inputs" in _one_error_line(capsys, "OutputError")
    other = tmp_path / "other.nii.gz"
    other.write_text("someone's file")
    assert main(["warp", "--field", str(field), "--image", str(moving), "--out", str(other)]) == 1
    assert f"--out {other} exists; pass --overwrite" in _one_error_line(capsys, "OutputError")
    assert _digest(tmp_path) == {**before, "other.nii.gz": hashlib.sha256(b"someone's file").hexdigest()}
    assert main(["warp", "--field", str(field), "--image", str(moving), "--out", str(other), "--overwrite"]) == 0
    assert nib.load(other).shape == (12, 12, 12)


# ------------------------------------------------------------------------------------- 2. one writer per folder
def test_a_second_run_into_a_folder_in_use_is_refused_at_once_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    with own_output_folder(out, "deepsim run"):  # another deepsim run is writing here
        before = _digest(out)
        started = time.perf_counter()
        assert main(["run", "--profile", "quick", "--out", str(out), "--no-progress"]) == 1
        assert time.perf_counter() - started < 60  # imports on a loaded machine included
        err = _one_error_line(capsys, "OutputError")
        assert f"{out}: deepsim (pid {os.getpid()}, since " in err and "is writing there now" in err
        assert _digest(out) == before


def test_a_lock_left_by_a_killed_run_does_not_block_the_next_one(tmp_path):
    """flock dies with its process: SIGKILL a holder, and the folder is free at once (no stale-lock cleanup)."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom deepsim.output_folder import "
                               "own_output_folder\nwith own_output_folder(sys.argv[1], 'deepsim run'):\n"
                               "    print('held', flush=True)\n    time.sleep(600)\n", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    fd = os.open(out / LOCK, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    os.close(fd)
    with own_output_folder(out, "deepsim run"):
        assert (out / MARKER).is_file()


@pytest.mark.slow
def test_two_runs_started_together_never_write_at_once_and_leave_a_working_store(two_runs_started_together):
    """Issue 21.2: two runs started together into one folder both failed ("Online migration ...") and broke
    mlflow.db for good. Now one run writes; the other is refused in one line (or, if it started after the first
    had finished, runs after it: never both at once); the store holds the finished runs and no half-migration."""
    out, runs = two_runs_started_together["out"], two_runs_started_together["runs"]
    codes = sorted(code for code, _ in runs)
    assert codes in ([0, 0], [0, 1]), runs
    for code, err in runs:
        if code == 0:
            assert err == "", err  # a successful -q run prints nothing on stderr (no stray log lines)
        else:
            assert err.count("\n") == 1 and "OutputError" in err and "is writing there now" in err, err
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parents = [r for r in client.search_runs([client.get_experiment_by_name("quick").experiment_id])
               if r.info.run_name.startswith("pipeline-")]
    assert len(parents) == codes.count(0) and all(r.info.status == "FINISHED" for r in parents)
    spans = sorted((r.info.start_time, r.info.end_time) for r in parents)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # never two at once
    import sqlite3

    tables = [t for (t,) in sqlite3.connect(out / "mlflow.db").execute("select name from sqlite_master")]
    assert not [t for t in tables if t.startswith("_alembic_tmp")]


def test_processes_creating_one_tracking_store_together_all_succeed_and_leave_it_usable(tmp_path):
    """Three processes create the same new SQLite store at once (the race behind issue 21.2): each waits for the
    store lock, MLflow's migrations run once, every process gets the experiment, and the store works after."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys\nfrom deepsim.tracking.mlflow_tracking import setup_tracking\n"
            "print(setup_tracking(sys.argv[1], 'exp'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc == 0 and out.strip() == uri and err == "" for rc, out, err in results), results
    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("exp").experiment_id)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


# ------------------------------------------------------------------------------- 10. same seed, same table
@pytest.mark.slow
def test_the_same_seed_gives_the_same_table_and_weights_in_a_later_run_into_the_same_folder(
        two_runs_started_together):
    """Issue 21.10: the same seed must give the same table on one machine. A third run (same profile, seed and
    losses) into the folder the concurrent runs used: it works (the store is fine) and reproduces every result
    cell (timings excluded: they are measurements) and every weight bit for bit."""
    out = two_runs_started_together["out"]
    first = (out / "report" / "results.csv").read_text().splitlines()
    weights = torch.load(out / "models" / "registration_mse.pt", weights_only=True)["state_dict"]
    proc = deepsim_process("run", "--profile", "quick", "--losses", "mse", "--seed", "0", "--out", str(out),
                           "--no-progress", umask=0o027)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    again = (out / "report" / "results.csv").read_text().splitlines()
    header = first[0].split(",")
    timing = [header.index(c) for c in ("inference_s", "train_time_s")]
    strip = lambda lines: [[v for i, v in enumerate(line.split(",")) if i not in timing] for line in lines]  # noqa
    assert again[0] == first[0] and strip(again) == strip(first)
    again_weights = torch.load(out / "models" / "registration_mse.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], again_weights[k]) for k in weights)


# ------------------------------------------------------------------------------------------- 9. file modes
@pytest.mark.slow
def test_every_file_and_folder_of_a_run_honours_the_umask(two_runs_started_together):
    """Issue 21.9: outputs, checkpoints and figures were written 0600 and data/ 0700 whatever the umask. Under
    umask 027 every file of the run (report, figures, checkpoints, training states, prepared data, MLflow store
    and artifact copies) is 0640 and every folder 0750."""
    out = two_runs_started_together["out"]
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")
             if (p.stat().st_mode & 0o777) != (0o750 if p.is_dir() else 0o640)}
    assert not wrong, wrong
    assert {"report", "models", "data", "mlartifacts"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_register_and_warp_outputs_honour_the_umask(tmp_path, model, capsys, umask):
    fixed, moving = _image(tmp_path / "f.nii.gz"), _image(tmp_path / "m.nii.gz", 1)
    old = os.umask(umask)
    try:
        assert _register(fixed, moving, tmp_path / "a" / "reg", model) == 0
        assert main(["warp", "--field", str(tmp_path / "a" / "reg" / "ddf_mm.nii.gz"), "--image", str(moving),
                     "--out", str(tmp_path / "a" / "w.nii.gz")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for p in (tmp_path / "a").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p
