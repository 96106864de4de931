"""Reliability: bad inputs stop with one line naming the file (or option) and the problem, exit 1, no output.

Covers users' datasets (``dataset: <folder or datalist>`` of ``deepsim run``, i.e. ``prepare_user_dataset``),
``deepsim register`` cases not in tests/test_register.py, profile configs, checkpoints and paths that try to leave
their folders. ``BAD_DATASETS`` / ``BAD_PROFILES`` are the table of docs/reliability.md.
"""

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.cli import main
from deepsim.data.datasets import load_datalist, prepare_user_dataset
from deepsim.data.pairs import _toy_labels
from deepsim.engine.checkpoints import load_network, save_checkpoint
from deepsim.errors import CheckpointError, DatasetError
from deepsim.features.networks import build_feature_net

sys.path.insert(0, str(Path(__file__).parent))
from test_register import _save_model  # noqa: E402  (the untrained registration model of the register tests)

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 22, 18)


def _subjects(folder: Path, n: int = 4) -> Path:
    """A valid flat folder of ``s<i>_image.nii.gz`` + ``s<i>_label.nii.gz`` (toy anatomy)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        labels = _toy_labels(SHAPE, rng)
        image = (labels * 0.1 + 0.3 * (labels > 0) + 0.01 * rng.standard_normal(SHAPE)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"s{i}_image.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / f"s{i}_label.nii.gz"))
    return folder


def _datalist(folder: Path, training: list, test: list | None = None) -> Path:
    content = {"training": training} if test is None else {"training": training, "test": test}
    (folder / "list.json").write_text(json.dumps(content))
    return folder / "list.json"


def _item(i: int) -> dict:
    return {"image": f"s{i}_image.nii.gz", "label": f"s{i}_label.nii.gz"}


def _save(path: Path, array: np.ndarray, affine=None) -> Path:
    img = nib.Nifti1Image(array, None)
    img.header.set_sform(np.eye(4) if affine is None else affine, code=1)  # any affine, singular ones too
    nib.save(img, str(path))
    return path


def _bad_dataset(case: str, src: Path) -> tuple[Path, str]:
    """Damage a valid dataset in ``src`` -> (what to prepare, text the one-line error must contain)."""
    image, label = src / "s1_image.nii.gz", src / "s1_label.nii.gz"
    rng = np.random.default_rng(0)
    data = np.asarray(nib.load(str(image)).dataobj)
    if case == "missing label map":
        label.unlink()
        return src, f"{image} has no label map {src / 's1_label.nii.gz'}"
    if case == "missing file in datalist":
        image.unlink()
        return _datalist(src, [_item(i) for i in range(4)]), f"{image} does not exist"
    if case == "not an image":
        image.write_text("subject 1, see spreadsheet\n")
        return src, f"{image} is not a readable image"
    if case == "truncated .nii.gz":
        raw = image.read_bytes()
        image.write_bytes(raw[: len(raw) // 2])
        return src, f"{image} is not a readable image"
    if case == "4D image":
        _save(image, np.stack([data, data], axis=-1))
        return src, f"{image} has 4 dimensions"
    if case == "2D image":
        _save(image, data[:, :, 5])
        return src, f"{image} has 2 dimensions (20, 22); expected a 3D volume"
    if case == "NaN voxels":
        bad = data.copy()
        bad[3, 4, 5] = np.nan
        _save(image, bad)
        return src, f"{image} contains NaN or Inf values"
    if case == "Inf voxels":
        bad = data.copy()
        bad[3, 4, 5] = -np.inf
        _save(image, bad)
        return src, f"{image} contains NaN or Inf values"
    if case == "constant image":
        _save(image, np.full(SHAPE, 0.7, np.float32))
        return src, f"{image}: the image is constant"
    if case == "label map on another grid":
        _save(label, np.asarray(nib.load(str(label)).dataobj), np.diag([2.0, 2.0, 2.0, 1.0]))
        return src, f"{label} has a different affine (voxel grid) than its image s1_image.nii.gz"
    if case == "label map of another shape":
        _save(label, np.zeros((20, 22, 17), np.int16))
        return src, f"{label} has shape (20, 22, 17) but its image s1_image.nii.gz (20, 22, 18)"
    if case == "non-integer labels":
        _save(label, (rng.random(SHAPE) * 3).astype(np.float32))
        return src, f"{label} has non-integer label values"
    if case == "empty label map":
        _save(label, np.zeros(SHAPE, np.int16))
        return src, f"{label}: the label map is empty"
    if case == "singular affine":
        _save(image, data, np.diag([1.0, 1.0, 0.0, 1.0]))
        _save(label, np.asarray(nib.load(str(label)).dataobj), np.diag([1.0, 1.0, 0.0, 1.0]))
        return src, f"{label}: the header's voxel-to-world affine is singular"
    if case == "datalist item without a label":
        return _datalist(src, [_item(0), {"image": "s1_image.nii.gz"}, _item(2), _item(3)]), \
            "'training' item 1 lacks ['label'] (it has ['image'])"
    if case == "datalist lists a subject twice":
        return _datalist(src, [_item(0), _item(1), _item(1), _item(2)], [_item(3)]), \
            f"{image} is listed twice ('training' item 1 and 'training' item 2)"
    if case == "datalist leaks a training image into test":
        return _datalist(src, [_item(0), _item(1), _item(2)], [_item(1)]), \
            f"{image} is listed twice ('training' item 1 and 'test' item 0)"
    if case == "datalist path escaping its folder":
        return _datalist(src, [_item(0), {"image": "../s1_image.nii.gz", "label": "s1_label.nii.gz"}]), \
            "path ../s1_image.nii.gz escapes the datalist's folder"
    if case == "datalist absolute path elsewhere":
        return _datalist(src, [_item(0), {"image": "/etc/hostname", "label": "s1_label.nii.gz"}]), \
            "path /etc/hostname escapes the datalist's folder"
    if case == "datalist not JSON":
        (src / "list.json").write_text("training: s0_image.nii.gz\n")
        return src / "list.json", "is not a readable JSON datalist"
    if case == "datalist without a training list":
        return _datalist(src, {"s0": _item(0)}), "has no 'training' list"
    raise AssertionError(case)


BAD_DATASETS = ["missing label map", "missing file in datalist", "not an image", "truncated .nii.gz", "4D image",
                "2D image", "NaN voxels", "Inf voxels", "constant image", "label map on another grid",
                "label map of another shape", "non-integer labels", "empty label map", "singular affine",
                "datalist item without a label", "datalist lists a subject twice",
                "datalist leaks a training image into test", "datalist path escaping its folder",
                "datalist absolute path elsewhere", "datalist not JSON", "datalist without a training list"]


@pytest.mark.parametrize("case", BAD_DATASETS)
def test_a_bad_user_dataset_is_one_line_naming_the_file_and_prepares_nothing(tmp_path, case):
    source, expected = _bad_dataset(case, _subjects(tmp_path / "src"))
    out = tmp_path / "run" / "data"
    with pytest.raises(DatasetError) as err:
        prepare_user_dataset(source, out, roi_size=(24, 24, 24), progress=False, num_workers=0)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert not out.exists() and (not out.parent.exists() or os.listdir(out.parent) == [])  # no staging folder left


def _profile_with(tmp_path: Path, change) -> Path:
    profile = json.loads((REPO / "configs" / "profiles" / "quick.json").read_text())
    change(profile)
    path = tmp_path / "my_profile.json"
    path.write_text(json.dumps(profile))
    return path


def test_deepsim_run_on_a_bad_user_dataset_exits_1_in_one_line_with_no_prepared_data(tmp_path, capsys):
    source, expected = _bad_dataset("empty label map", _subjects(tmp_path / "src"))
    profile = _profile_with(tmp_path, lambda p: p["common"].update(dataset=str(source)))
    out = tmp_path / "out"
    assert main(["run", "--profile", str(profile), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deepsim: error: DatasetError: ") and expected in err, err
    assert not (out / "data").exists() and not (out / "models").exists() and not (out / "report").exists()


BAD_PROFILES = {
    "misspelt key": (lambda p: p["stages"]["registration"].update(max_epoch=3),
                     "stages.registration has unknown keys ['max_epoch'] (not in the bundle's configs; a typo?)"),
    "wrong type": (lambda p: p["stages"]["registration"].update(max_epochs="3"),
                   "stages.registration.max_epochs must be an integer like the bundle's default 6, got \"3\""),
    "float where an integer is needed": (lambda p: p["stages"]["feature_ae"].update(epoch_length=2.5),
                                         "stages.feature_ae.epoch_length must be an integer"),
    "list where a number is needed": (lambda p: p["common"].update(spacing_mm=[2, 2, 2]),
                                      "common.spacing_mm must be a number like the bundle's default 2.0, got "
                                      "[2, 2, 2]"),
    "losses as a string": (lambda p: p.update(losses="mse"), "losses must be a list, got \"mse\""),
    "negative lambda": (lambda p: p["lambdas"].update(mse=-1), "lambdas.mse must be a number >= 0, got -1"),
    "unknown stage": (lambda p: p["stages"].update(registraton={}), "stages has the unknown stage 'registraton'"),
    "unknown top-level key": (lambda p: p.update(epochs=3), "unknown keys ['epochs']"),
    "unknown loss": (lambda p: p.update(losses=["mse", "vgg"]), "unknown losses ['vgg']"),
    # issue 21.7: values of the right type but outside their range, refused naming the key before anything runs
    "negative learning rate": (lambda p: p["common"].update(learning_rate=-0.001),
                               "common.learning_rate must be a finite number > 0, got -0.001"),
    "NaN lambda": (lambda p: p["lambdas"].update(mse=float("nan")), "lambdas.mse must be a number >= 0, got NaN"),
    "NaN regularization weight of one loss": (
        lambda p: p["stages"]["registration_by_loss"].update(mse={"regularization_weight": float("nan")}),
        "stages.registration_by_loss.mse.regularization_weight must be a finite number >= 0, got NaN"),
    "unknown precision": (lambda p: p["common"].update(precision="fp8"),
                          "common.precision must be \"fp32\" or \"bf16\", got \"fp8\""),
    "zero epochs": (lambda p: p["stages"]["registration"].update(max_epochs=0),
                    "stages.registration.max_epochs must be an integer >= 1, got 0"),
    "zero spacing": (lambda p: p["common"].update(dataset="embedded", spacing_mm=0),
                     "common.spacing_mm must be a finite number > 0, got 0"),
    "a spacing the toy data ignore": (lambda p: p["common"].update(spacing_mm=1.0),
                                      "common.spacing_mm 1.0: the toy dataset is generated at 2 mm and would ignore "
                                      "it"),
    "empty channel list": (lambda p: p["common"].update(registration_channels=[]),
                           "common.registration_channels must be a non-empty list of integers >= 1, got []"),
    "unknown pair source": (lambda p: p["common"].update(pairs="synth"),
                            "common.pairs must be \"fixed\" or \"synthetic\", got \"synth\""),
    "networks_after_affine as a string": (lambda p: p.update(networks_after_affine="yes"),
                                          "networks_after_affine must be true or false, got \"yes\""),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_a_bad_profile_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, case):
    change, expected = BAD_PROFILES[case]
    profile = _profile_with(tmp_path, change)
    out = tmp_path / "out"
    assert main(["run", "--profile", str(profile), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deepsim: error: ConfigError: {profile}: ") and expected in err, err
    assert not out.exists()


def test_a_profile_that_is_not_json_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"common": {"dataset": "toy"},}')
    assert main(["run", "--profile", str(path), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"deepsim: error: ConfigError: {path}: invalid JSON")


# ----------------------------------------------------------------------------------- deepsim register, extra
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model") / "registration_mse.pt")


def _register(tmp: Path, default_model: Path, **files) -> tuple[list[str], Path]:
    rng = np.random.default_rng(0)
    paths = {"fixed": _save(tmp / "fixed.nii.gz", rng.random((12, 12, 12)).astype(np.float32)),
             "moving": _save(tmp / "moving.nii.gz", rng.random((12, 12, 12)).astype(np.float32)), **files}
    out = tmp / "reg"
    argv = ["register", "--out", str(out), "--model", str(paths.pop("model", default_model)), "--no-progress"]
    for key, path in paths.items():
        argv += [f"--{key.replace('_', '-')}", str(path)]
    return argv, out


def _register_cases(case: str, tmp: Path, model: Path) -> tuple[dict, str]:
    rng = np.random.default_rng(2)
    if case == "empty label map":
        empty = _save(tmp / "empty_label.nii.gz", np.zeros((12, 12, 12), np.int16))
        return {"fixed_label": empty, "moving_label": empty}, f"DatasetError: {empty}: the label map is empty"
    if case == "Inf voxels":
        array = rng.random((12, 12, 12)).astype(np.float32)
        array[1, 2, 3] = np.inf
        bad = _save(tmp / "inf.nii.gz", array)
        return {"moving": bad}, f"DatasetError: {bad}: contains NaN or infinite voxels"
    if case == "NaN affine":
        bad = tmp / "nan_affine.nii.gz"
        img = nib.Nifti1Image(rng.random((12, 12, 12)).astype(np.float32), None)
        img.header.set_sform(np.diag([1.0, np.nan, 1.0, 1.0]), code=1)
        nib.save(img, str(bad))
        return {"fixed": bad}, f"DatasetError: {bad}: the header's voxel-to-world affine holds NaN"
    if case == "complex voxels":
        bad = _save(tmp / "complex.nii.gz", (rng.random((12, 12, 12)) * 1j).astype(np.complex64))
        return {"moving": bad}, f"DatasetError: {bad}: voxel type complex64 is not real-valued"
    if case == "checkpoint of another architecture":
        bad = tmp / "registration_other.pt"
        payload = torch.load(model, weights_only=True)
        payload["kwargs"]["channels"] = [8, 8, 8]
        torch.save(payload, bad)
        return {"model": bad}, (f"CheckpointError: {bad}: weights do not match the stored architecture (8 of another "
                                "shape (first backbone.model.0.conv.weight: (4, 2, 3, 3, 3) in the file, "
                                "(8, 2, 3, 3, 3) in the network))")
    if case == "checkpoint holding pickled code":
        bad = tmp / "registration_pickle.pt"
        torch.save({"format": 1, "builder": "registration_net", "kwargs": {}, "state_dict": {},
                    "meta": {"hook": os.system}}, bad)  # weights_only=True refuses to unpickle a function
        return {"model": bad}, (f"CheckpointError: {bad}: not a readable deepsim checkpoint (it holds pickled Python "
                                "objects, which are never loaded: torch.load(weights_only=True))")
    raise AssertionError(case)


BAD_REGISTER = ["empty label map", "Inf voxels", "NaN affine", "complex voxels", "checkpoint of another architecture",
                "checkpoint holding pickled code"]


@pytest.mark.parametrize("case", BAD_REGISTER)
def test_more_bad_register_inputs_exit_1_with_one_line_and_write_nothing(tmp_path, model, capsys, case):
    files, expected = _register_cases(case, tmp_path, model)
    argv, out = _register(tmp_path, model, **files)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("deepsim: error: ") and expected in captured.err, captured.err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".reg")]


# ------------------------------------------------------------------------------------------- checkpoints, paths
def test_a_feature_net_where_a_registration_net_is_needed_is_refused_naming_both(tmp_path):
    kwargs = {"kind": "ae", "spatial_dims": 3, "in_channels": 1, "channels": [4, 8]}
    path = save_checkpoint(tmp_path / "registration_mse.pt", build_feature_net(**kwargs), "feature_net", kwargs)
    with pytest.raises(CheckpointError, match=f"{path}: a feature_net checkpoint, but a registration_net is needed"):
        load_network(path, builder="registration_net")


def test_no_path_from_a_datalist_writes_outside_the_output_folder(tmp_path):
    """Subject names and file names come from the user; every file prepared lands in the output folder."""
    src = _subjects(tmp_path / "src")
    items = [{**_item(i), "subject": f"../../escape{i}"} for i in range(4)]
    out = tmp_path / "run" / "data"
    path = prepare_user_dataset(_datalist(src, items[:3], items[3:]), out, roi_size=(24, 24, 24), progress=False,
                                num_workers=0)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {p for p in src.rglob("*")}
    assert written and all(p.is_relative_to(out) for p in written)
    assert all(Path(it["image"]).is_relative_to(out) for it in load_datalist(path)["training"])


def test_a_prepared_datalist_cannot_point_outside_its_folder_or_repeat_an_id(tmp_path):
    content = {"training": [{"image": "../x_image.nii.gz", "label": "x_label.nii.gz", "subject": "x", "id": "x"}],
               "test": [], "label_values": [0, 1], "roi_size": [8, 8, 8]}
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="path ../x_image.nii.gz escapes the datalist's folder"):
        load_datalist(tmp_path)
    item = {"image": "x_image.nii.gz", "label": "x_label.nii.gz", "subject": "x", "id": "x"}
    content["training"] = [item, item]
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="id 'x' appears twice in 'training'"):
        load_datalist(tmp_path)
