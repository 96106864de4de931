"""MONAI's own bundle tools accept both bundles: the model-zoo layout, verify_metadata (against the schema copy in
tests/data), verify_net_in_out, load, ckpt_export (trace) and our torch.export path for the two-input network."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, load, verify_metadata, verify_net_in_out
from packaging.version import Version

from deepsim.registration.export import export_registration, load_exported, save_registration
from deepsim.resources import bundle_dir

SCHEMA = Path(__file__).parent / "data" / "bundle_metadata_schema.json"
BUNDLES = ["brain_mri", "cells_2d"]
LAYOUT = ["configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
          "docs/README.md", "docs/data_license.txt", "LICENSE"]


def _files(name):
    root = bundle_dir(name)
    return root, str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")


def _pair(name, side, batch=1):
    ndim = 3 if name == "brain_mri" else 2
    generator = torch.Generator().manual_seed(0)
    return [torch.rand((batch, 1, *[side] * ndim), generator=generator) for _ in range(2)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("half_res, diffeomorphic", [(False, False), (True, True)])
def test_one_stacked_input_gives_the_two_input_field(spatial_dims, half_res, diffeomorphic):
    from deepsim.registration.network import RegistrationNet

    net = RegistrationNet(spatial_dims, 1, (8, 16, 16), diffeomorphic=diffeomorphic, half_res=half_res).eval()
    torch.nn.init.normal_(net.flow[1].weight, std=0.1)  # a field far from zero
    moving, fixed = (torch.rand(2, 1, *[16] * spatial_dims) for _ in range(2))
    with torch.no_grad():
        two = net(moving, fixed)
        assert two.shape == (2, spatial_dims, *[16] * spatial_dims) and two.abs().max() > 0.01
        assert torch.equal(net(torch.cat([moving, fixed], dim=1)), two)
    with pytest.raises(ValueError, match="stacked on the channel axis"):
        net(moving)


def test_torch_export_of_the_stacked_call_keeps_free_sizes():
    from deepsim.registration.network import RegistrationNet

    net = RegistrationNet(2, 1, (4, 8)).eval()
    torch.nn.init.normal_(net.flow[1].weight, std=0.1)
    exported = export_registration(net, stacked=True).module()
    for shape in ((1, 2, 8, 12), (3, 2, 20, 6)):
        image = torch.rand(shape)
        with torch.no_grad():
            assert torch.allclose(exported(image), net(image), atol=1e-6)


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_has_the_model_zoo_files(name):
    root = bundle_dir(name)
    assert [f for f in LAYOUT if not (root / f).is_file()] == []
    assert (root / "models" / "model.pt").stat().st_size < 2_000_000
    assert "Apache License" in (root / "LICENSE").read_text()


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_passes_the_schema_offline(name):
    _, meta, _ = _files(name)
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))  # the file exists, so nothing is downloaded


def test_the_schema_refuses_a_tensor_without_modality(tmp_path):
    _, meta, _ = _files("brain_mri")
    broken = json.loads(Path(meta).read_text())
    del broken["network_data_format"]["inputs"]["image"]["modality"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="modality"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_states_the_versions_we_install(name):
    import ignite
    import monai
    import numpy

    meta = json.loads(Path(_files(name)[1]).read_text())

    def major_minor(version):
        return Version(version).release[:2]

    assert major_minor(meta["monai_version"]) == major_minor(monai.__version__)
    assert major_minor(meta["pytorch_version"]) == major_minor(torch.__version__.split("+")[0])
    assert major_minor(meta["required_packages_version"]["pytorch-ignite"]) == major_minor(ignite.__version__)
    stated = Version(meta["numpy_version"])
    assert stated.major == Version(numpy.__version__).major and stated <= Version(numpy.__version__)


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out_accepts_the_inference_network(name):
    _, meta, config = _files(name)
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=2)


@pytest.mark.parametrize("name", BUNDLES)
def test_monai_load_returns_the_shipped_network_without_downloading(name, monkeypatch):
    import monai.bundle.scripts as scripts

    monkeypatch.setattr(scripts, "download", lambda *a, **k: pytest.fail("monai.bundle.load tried to download"))
    root, _, _ = _files(name)
    net = load(name=name, bundle_dir=str(root.parent), workflow_type="inference", device="cpu")
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    moving, fixed = _pair(name, 32)
    with torch.no_grad():
        ddf = net.eval()(torch.cat([moving, fixed], dim=1))
    assert ddf.shape == (1, moving.ndim - 2, *moving.shape[2:]) and ddf.abs().max() > 0


def test_brain_model_pt_holds_the_pretrained_checkpoints_weights():
    from deepsim.registration.model import resolve_model

    shipped = resolve_model(None).network
    state = torch.load(bundle_dir("brain_mri") / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(shipped.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", BUNDLES)
def test_torch_export_keeps_two_inputs_and_free_sizes(name, tmp_path):
    root, _, _ = _files(name)
    net = load(name=name, bundle_dir=str(root.parent), workflow_type="inference", device="cpu").eval()
    path = save_registration(net, tmp_path / "registration.pt2")
    exported = load_exported(path)
    multiple = net.size_multiple
    for side, batch in ((2 * multiple, 1), (3 * multiple, 2)):
        moving, fixed = _pair(name, side, batch)
        with torch.no_grad():
            assert torch.allclose(exported(moving, fixed), net(moving, fixed), atol=1e-5)


@pytest.mark.parametrize("name", BUNDLES)
def test_monai_ckpt_export_traces_the_stacked_input(name, tmp_path):
    from monai.data import load_net_with_metadata

    root, meta, config = _files(name)
    side = 2 * (16 if name == "brain_mri" else 8)
    ndim = 3 if name == "brain_mri" else 2
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=meta, config_file=config, use_trace=True, input_shape=[1, 2, *[side] * ndim])
    scripted, meta_values, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert meta_values["version"] == json.loads(Path(meta).read_text())["version"]
    net = load(name=name, bundle_dir=str(root.parent), workflow_type="inference", device="cpu").eval()
    image = torch.cat(_pair(name, side), dim=1)
    with torch.no_grad():
        assert torch.allclose(scripted(image), net(image), atol=1e-5)


def test_bundle_inference_runs_standalone_from_the_bundle_folder(tmp_path, monkeypatch):
    """The model-zoo way: inference.json alone, from a copy of the bundle, the shipped weights via network_def."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import run

    copy = tmp_path / "cells_2d"
    shutil.copytree(bundle_dir("cells_2d"), copy)
    rng = np.random.default_rng(0)
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(rng.random((48, 40)).astype(np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    monkeypatch.chdir(copy)
    run(config_file="configs/inference.json", fixed=str(tmp_path / "fixed.nii.gz"),
        moving=str(tmp_path / "moving.nii.gz"), output_dir=str(tmp_path / "out"), progress=False)
    report = json.loads((tmp_path / "out" / "inference" / "registration.json").read_text())
    assert report["model"].endswith("models/model.pt") and report["similarity"] == "mse"
    assert nib.load(tmp_path / "out" / "inference" / "ddf_mm.nii.gz").shape[:2] == (48, 40)


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset", [("brain_mri", "toy"), ("cells_2d", "cells")])
def test_monai_tracking_mlflow_logs_our_trainer(name, dataset, tmp_path, monkeypatch):
    """``python -m monai.bundle run ... --tracking mlflow``: MONAI's MLFlowHandler on our trainer's output."""
    import mlflow
    from monai.bundle import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over the handler's URI
    configs = bundle_dir(name) / "configs"
    run(config_file=[str(configs / "common.json"), str(configs / "train_registration.json")],
        meta_file=str(configs / "metadata.json"), tracking="mlflow", output_dir=str(tmp_path), dataset=dataset,
        similarity="mse", max_epochs=2, epoch_length=2, validation_pairs=1, progress=False,
        run_name=f"tracking-{name}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("monai_experiment")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == f"tracking-{name}"
    steps = client.get_metric_history(found.info.run_id, "train_loss")
    assert [m.step for m in steps] == [1, 2, 3, 4] and all(m.value > 0 for m in steps)
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/dice")] == [1, 2]
    assert (tmp_path / "models" / "registration_mse.pt").is_file()
