"""``registration_init``: a registration stage starts from a trained network (loaded strictly, refused in one line
when its architecture differs or the file is missing), and the main job checks it before anything runs. Every
shipped profile trains from scratch until a pretrained synthetic network ships; a profile with
``networks_after_affine`` scores each network after the affine stage, whose fit the rows that start with it share.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepsim.engine.checkpoints import load_checkpoint, save_checkpoint
from deepsim.engine.warm_start import architecture, check_init, warm_start
from deepsim.errors import CheckpointError, ConfigError
from deepsim.registration.network import RegistrationNet
from deepsim.workflow import evaluation_methods, load_profile, network_of_row, registration_overrides, run_stage

QUICK_NET = {"spatial_dims": 3, "in_channels": 1, "channels": [4, 8, 8], "diffeomorphic": False, "half_res": True}


def _checkpoint(path: Path, seed: int = 1, **kwargs) -> Path:
    torch.manual_seed(seed)
    kwargs = {**QUICK_NET, **kwargs}
    network = RegistrationNet(**kwargs)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p))  # far from any fresh initialisation
    return save_checkpoint(path, network, "registration_net", kwargs, {"similarity": "dice"})


def test_the_weights_are_loaded_strictly_into_the_stage_network(tmp_path):
    path = _checkpoint(tmp_path / "init.pt")
    network = warm_start(RegistrationNet(**QUICK_NET), path, "registration_net", QUICK_NET)
    saved = load_checkpoint(path)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())
    fresh = RegistrationNet(**QUICK_NET)
    assert warm_start(fresh, None, "registration_net", QUICK_NET) is fresh


def test_defaults_spelt_out_or_left_out_are_one_architecture():
    assert architecture("registration_net", {"channels": (4, 8, 8)}) == architecture(
        "registration_net", {**QUICK_NET, "half_res": False, "integration_steps": 7, "spatial_dims": 3})


def test_another_architecture_is_one_line_naming_the_file_and_both(tmp_path):
    path = _checkpoint(tmp_path / "wide.pt", channels=[8, 16, 16])
    with pytest.raises(ConfigError) as info:
        warm_start(RegistrationNet(**QUICK_NET), path, "registration_net", QUICK_NET)
    message = str(info.value)
    assert "\n" not in message and f"registration_init {path}" in message
    assert "registration_net(channels=[8, 16, 16])" in message and "registration_net(channels=[4, 8, 8])" in message
    with pytest.raises(ConfigError, match="holds a registration_net, but this stage trains a feature_net"):
        check_init(path, "feature_net", {"kind": "ae", "spatial_dims": 3})
    with pytest.raises(ConfigError, match="no such checkpoint file .*set registration_init to null"):
        check_init(tmp_path / "missing.pt", "registration_net", QUICK_NET)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pt: not a deepsim checkpoint"):
        check_init(tmp_path / "text.pt", "registration_net", QUICK_NET)


def test_the_registration_stage_fine_tunes_from_registration_init(quick_common, tmp_path):
    init = _checkpoint(tmp_path / "init.pt")
    models = Path(quick_common["output_dir"]) / "models"
    short = {"similarity": "mse", "max_epochs": 1, "epoch_length": 1, "validation_pairs": 1, "learning_rate": 1e-9}
    run_stage("registration", {**quick_common, **short, "registration_init": str(init)})
    tuned = load_checkpoint(models / "registration_mse.pt")
    start = load_checkpoint(init)["state_dict"]
    # one Adam step of 1e-9 moves no weight further than ~1e-9: the training started from the checkpoint
    assert all(torch.allclose(v, start[k], atol=1e-6) for k, v in tuned["state_dict"].items())
    assert tuned["meta"]["registration_init"] == str(init)
    run_stage("registration", {**quick_common, **short})
    scratch = load_checkpoint(models / "registration_mse.pt")["state_dict"]
    assert not all(torch.allclose(v, start[k], atol=1e-6) for k, v in scratch.items())
    from deepsim.cli import _user_error

    wide = _checkpoint(tmp_path / "wide.pt", channels=[8, 16, 16])
    with pytest.raises(RuntimeError) as info:  # MONAI's config parser wraps what its components raise
        run_stage("registration", {**quick_common, **short, "registration_init": str(wide)})
    error = _user_error(info.value)  # what the command line reports, in one line
    assert isinstance(error, ConfigError) and "differs from this stage's registration_net" in str(error)


def test_the_main_job_refuses_a_missing_init_before_it_writes_anything(tmp_path, capsys):
    from deepsim.cli import main

    quick = json.loads(Path(load_profile("quick").source).read_text())
    quick["stages"]["registration"]["registration_init"] = str(tmp_path / "nowhere.pt")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(quick))
    assert main(["run", "--profile", str(profile), "--out", str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"registration_init {tmp_path / 'nowhere.pt'}: no such checkpoint file" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_default_profile_trains_every_loss_from_scratch_with_the_pretraining_architecture():
    """No pretrained synthetic network ships yet, so the default keeps main's job: no registration_init, centre
    alignment; its network is the architecture the pretraining uses, so a shipped checkpoint will load strictly."""
    from monai.bundle import ConfigParser

    from deepsim.workflow import STAGE_FILES, bundle_dir, stage_common

    profile = load_profile("default")
    bundle = bundle_dir(profile.bundle)
    for loss in profile.losses:
        parser = ConfigParser()
        configs = bundle / "configs"
        parser.read_config([str(configs / "common.json"), str(configs / STAGE_FILES["registration"])])
        parser.update({"bundle_root": str(bundle),
                       **registration_overrides(profile, stage_common(profile, Path("out")), loss)})
        assert parser.get_parsed_content("registration_init") is None
        assert parser.get_parsed_content("alignment") == "centre" and parser.get_parsed_content("pairs") == "fixed"
        # the architecture the lead's pretraining uses (issue 25): a checkpoint of it loads strictly
        assert architecture("registration_net", parser.get_parsed_content("network_kwargs")) == architecture(
            "registration_net", {"spatial_dims": 3, "in_channels": 1, "channels": (16, 32, 32, 32),
                                 "diffeomorphic": False, "half_res": True})


def test_networks_are_scored_alone_unless_the_profile_scores_them_after_the_affine_stage(tmp_path):
    profile = load_profile("default")
    assert evaluation_methods(profile, profile.losses) == ["identity", "affine", "mse", "ncc", "deepsim-ae",
                                                           "deepsim-seg", "ncc+io"]  # main's table, unchanged
    raw = json.loads(Path(profile.source).read_text())
    (tmp_path / "after.json").write_text(json.dumps({**raw, "networks_after_affine": True}))
    after = load_profile(str(tmp_path / "after.json"))
    assert evaluation_methods(after, after.losses) == ["identity", "affine", "affine+mse", "affine+ncc",
                                                       "affine+deepsim-ae", "affine+deepsim-seg", "ncc+io"]
    # without hybrids the affine row still comes with the networks after it, and not without them
    assert evaluation_methods(replace(after, hybrids=[]), ["mse"]) == ["identity", "affine", "affine+mse"]
    paper = load_profile("paper_brain")
    assert evaluation_methods(paper, ["mse", "ncc"]) == ["identity", "mse", "ncc"]  # no affine row: as trained
    assert [network_of_row(m) for m in ("affine+ncc", "ncc", "ncc+io", "affine", "identity")] == [
        "ncc", "ncc", None, None, None]


def test_the_rows_after_the_affine_share_one_fit_per_pair_and_score_as_separate_fits(quick_common, tmp_path,
                                                                                    monkeypatch):
    """affine, affine+<loss> and <loss>+io start from one affine fit per test pair: the fit runs once per pair, not
    once per row, and every row's metrics are those of an evaluation that fits the affine for that row alone."""
    import pandas as pd

    from deepsim.evaluation.evaluate import evaluate_methods
    from deepsim.registration.affine import AffineRegistration

    out = Path(quick_common["output_dir"])
    run_stage("registration", {**quick_common, "similarity": "mse", "max_epochs": 1, "epoch_length": 1,
                               "validation_pairs": 1})
    fit_seconds = []
    original = AffineRegistration.__call__

    def counted(self, *args):
        result = original(self, *args)
        fit_seconds.append(float(result.seconds))
        return result

    monkeypatch.setattr(AffineRegistration, "__call__", counted)
    args = dict(datalist_path=out / "data" / "datalist.json", models_dir=out / "models", device="cpu",
                progress=False, figures_enabled=False)
    methods = ["affine", "affine+mse", "mse+io"]
    evaluate_methods(methods=methods, report_dir=tmp_path / "shared", **args)
    shared = pd.read_csv(tmp_path / "shared" / "results.csv")
    pairs = shared["pair_id"].nunique()
    assert pairs >= 2 and len(fit_seconds) == pairs  # not one per row and pair
    shared_fits = list(fit_seconds)
    for method in methods:
        evaluate_methods(methods=[method], report_dir=tmp_path / method, **args)
    assert len(fit_seconds) == pairs * (1 + len(methods))  # each separate evaluation fits its own
    separate = pd.concat([pd.read_csv(tmp_path / m / "results.csv") for m in methods], ignore_index=True)
    columns = ["method", "pair_id", "fixed_id", "moving_id", "dice_mean", "folding_pct", "std_logjac"]
    pd.testing.assert_frame_equal(shared[columns], separate[columns])  # the same rows, metric for metric
    labels = [pd.read_csv(tmp_path / d / "dice_per_label.csv") for d in ("shared", *methods)]
    pd.testing.assert_frame_equal(labels[0], pd.concat(labels[1:], ignore_index=True))
    # a row that reuses a fit still counts its seconds: the time of the whole registration
    for method in ("affine+mse", "mse+io"):
        seconds = shared.loc[shared["method"] == method, "inference_s"].to_numpy()
        assert all(s >= fit for s, fit in zip(seconds, shared_fits))
