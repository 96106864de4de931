"""Reliability: every user-facing failure of the command line is one line on stderr and an exit status that says
whose mistake it is — 2 for a wrong command line (argparse and UsageError), 1 for everything else a user can fix
(files, configs, checkpoints, folders, devices) — never a traceback, and nothing is written. The cases are the ones
issue 21 found by trying to break deepsim (item 4 and the smaller ones), typed as a user would."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_register import _save_model  # noqa: E402

pytestmark = pytest.mark.reliability


def _image(path: Path, shape=(12, 12, 12), affine=None, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model") / "registration_mse.pt")


def _case(name: str, tmp: Path, model: Path, monkeypatch) -> tuple[list[str], int, str]:
    """(argv, exit status, text of the one stderr line) of one hostile command line."""
    fixed, moving = _image(tmp / "f.nii.gz"), _image(tmp / "m.nii.gz", seed=1)
    register = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model), "--no-progress"]
    out = ["--out", str(tmp / "reg")]
    if name == "register --out an existing file":
        (tmp / "reg").write_text("a file")
        return register + out, 1, f"OutputError: {tmp / 'reg'} is a file, not a folder; --out takes a folder"
    if name == "register --out a read-only folder":
        folder = tmp / "ro"
        folder.mkdir(mode=0o555)
        real_access = __import__("os").access
        # root may write anywhere: show it the folder as an ordinary user sees it (its real mode is r-x)
        monkeypatch.setattr("os.access", lambda p, mode, **k: False if Path(p) == folder and mode & 2 else
                            real_access(p, mode, **k))
        return register + ["--out", str(folder / "reg")], 1, f"OutputError: {folder / 'reg'}: cannot write into " \
                                                              f"{folder} (permission denied)"
    if name == "--device bogus":
        return register + out + ["--device", "bogus"], 2, "deepsim register: error: argument --device: not a torch " \
                                                        "device; use cpu, cuda, cuda:<index>, mps or xpu"
    if name == "--device cuda without a GPU":
        return register + out + ["--device", "cuda"], 1, "ConfigError: --device cuda: torch sees no CUDA device on " \
                                                       "this machine"
    if name.startswith("--spacing "):
        value = name.split()[1]
        return register + out + ["--spacing", value], 2, f"deepsim register: error: argument --spacing: expected " \
                                                         f"a positive number, got '{value}'"
    if name == "--iterations -1":
        return register + out + ["--iterations", "-1"], 2, "argument --iterations: expected an integer >= 0"
    if name == "--learning-rate 0":
        return register + out + ["--learning-rate", "0"], 2, "argument --learning-rate: expected a positive number"
    if name == "run --seed -1":
        return ["run", "--profile", "quick", "--seed", "-1", *out], 2, \
            "deepsim run: error: argument --seed: expected an integer seed from 0 to 2**32 - 1, got '-1'"
    if name == "run --losses vgg":
        return ["run", "--profile", "quick", "--losses", "vgg", *out], 2, "UsageError: --losses: unknown losses ['vgg']"
    if name == "an unknown flag":
        return register + out + ["--affine-only"], 2, "deepsim: error: unrecognized arguments: --affine-only"
    if name == "warp --out without a NIfTI extension":
        return ["warp", "--field", str(fixed), "--image", str(moving), "--out", str(tmp / "warped.png")], 2, \
            f"UsageError: --out {tmp / 'warped.png'}: the output must be a NIfTI file name ending in .nii.gz or .nii"
    if name == "a field with a singular affine":
        field = tmp / "field.nii.gz"
        img = nib.Nifti1Image(np.zeros((12, 12, 12, 1, 3), np.float32), None)
        img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
        nib.save(img, str(field))
        return ["warp", "--field", str(field), "--image", str(moving), "--out", str(tmp / "w.nii.gz")], 1, \
            f"DatasetError: {field}: the header's voxel-to-world affine is singular"
    if name == "a folder passed as the image":
        (tmp / "scans").mkdir()
        return register[:2] + [str(tmp / "scans")] + register[3:] + out, 1, \
            f"DatasetError: {tmp / 'scans'}: a folder, not a NIfTI image file"
    if name == "a NIfTI passed as --model":
        return register[:6] + [str(moving)] + register[7:] + out, 1, \
            f"CheckpointError: {moving}: not a deepsim checkpoint: a gzip file (a .nii.gz image?), not a file " \
            "written by torch.save"
    if name == "an uncompressed NIfTI passed as --model":
        plain = tmp / "m.nii"
        nib.save(nib.load(moving), str(plain))
        return register[:6] + [str(plain)] + register[7:] + out, 1, \
            f"CheckpointError: {plain}: not a deepsim checkpoint: a NIfTI image"
    if name == "a micron file the size of a cell":  # 12 voxels of 1 micron: 0.011 mm, nothing a 2 mm model sees
        tiny = _image(tmp / "cell.nii.gz", affine=np.diag([1.0, 1.0, 1.0, 1.0]))
        img = nib.load(tiny)
        img.header.set_xyzt_units("micron")
        nib.save(img, str(tiny))
        return register[:2] + [str(tiny)] + register[3:] + out, 1, \
            f"DatasetError: {tiny}: the image spans 0.011 x 0.011 x 0.011 mm, less than 4 voxels of the model's 2 mm"
    raise AssertionError(name)


CASES = ["register --out an existing file", "register --out a read-only folder", "--device bogus",
         "--device cuda without a GPU", "--spacing 0", "--spacing -1", "--spacing nan", "--iterations -1",
         "--learning-rate 0", "run --seed -1", "run --losses vgg", "an unknown flag",
         "warp --out without a NIfTI extension", "a field with a singular affine", "a folder passed as the image",
         "a NIfTI passed as --model", "an uncompressed NIfTI passed as --model", "a micron file the size of a cell"]


@pytest.mark.parametrize("case", CASES)
def test_each_hostile_command_line_is_one_line_with_its_exit_status_and_writes_nothing(tmp_path, model, capsys,
                                                                                       monkeypatch, case):
    if case == "--device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv, status, expected = _case(case, tmp_path, model, monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == status
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and expected in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no staging folder left


def test_usage_errors_exit_2_and_other_errors_exit_1_as_the_help_says(capsys):
    """The exit statuses are documented where users look: `deepsim --help`."""
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit status:" in text and "1 a problem with input files" in text and "2 a wrong command line" in text
    assert "130 interrupted" in text


def test_an_operating_system_error_while_writing_is_one_line_not_a_traceback(tmp_path, model, monkeypatch, capsys):
    """A disk that fills up (or a folder made read-only) while register writes: one line naming the file, exit 1."""
    from deepsim.registration import inference

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(inference, "save_volume", full_disk)
    argv, _, _ = _case("--iterations -1", tmp_path, model, monkeypatch)
    argv = [a for a in argv if a not in ("--iterations", "-1")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepsim: error: OSError: [Errno 28] No space left on device: ")
    assert "jacobian_det.nii.gz" in err or "warped_label.nii.gz" in err
    assert not (tmp_path / "reg").exists()
