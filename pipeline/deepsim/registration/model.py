"""Find and load a trained registration model: a checkpoint, a folder (output or bundle), an MLflow run, or the default.

A model is a registration checkpoint (``registration_<loss>.pt``, see :mod:`deepsim.engine.checkpoints`) plus what
inference needs to know about its training: the voxel spacing (mm, RAS-oriented grid), its loss and λ (for
test-time instance optimisation), and the folder holding the feature net a DeepSim loss needs
(``feature_<kind>.pt`` beside the checkpoint).

``MODEL`` may be:

- omitted: the pretrained brain model shipped in the package (``bundles/brain_mri/models/pretrained/``);
- a ``.pt`` file;
- a folder with one ``registration_*.pt`` in it or in its ``models/`` subfolder (a ``deepsim run`` output folder,
  a bundle folder); with several, ``similarity`` picks one;
- an MLflow run: ``runs:/<run_id>`` or a bare 32-hex run id, whose ``checkpoint/`` artifacts are downloaded from
  the tracking server (``tracking_uri`` or ``MLFLOW_TRACKING_URI``);
- an MLflow model: ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (the Model Registry; ``deepsim run``
  registers ``deepsim-<experiment>`` with the alias ``best``) or ``models:/<model id>``. Its ``extra_files/``
  hold our checkpoint (:mod:`deepsim.tracking.models`), read with ``weights_only=True`` like any other.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepsim.engine.checkpoints import describe_mismatch, load_checkpoint, load_failure, load_network
from deepsim.errors import CheckpointError, ConfigError, first_line

__all__ = ["RegistrationModel", "resolve_model", "default_model_dir", "from_weights"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class RegistrationModel:
    """A loaded registration network and the facts of its training that inference needs."""

    network: torch.nn.Module
    checkpoint: Path
    spacing_mm: float
    similarity: str | None = None
    regularization_weight: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return int(getattr(self.network, "spatial_dims", 3))

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.network, "size_multiple", 1))

    @property
    def models_dir(self) -> Path:
        """Where a DeepSim loss finds its feature net (``feature_<kind>.pt``): beside the checkpoint."""
        return self.checkpoint.parent


def default_model_dir() -> Path:
    """Folder of the pretrained brain model shipped in the package."""
    from deepsim.resources import bundle_dir

    return bundle_dir("brain_mri") / "models" / "pretrained"


def _from_folder(folder: Path, similarity: str | None) -> Path:
    for candidate in (folder, folder / "models"):
        # training-state files (registration_<loss>.state.pt, for --resume) are not models
        found = sorted(f for f in candidate.glob("registration_*.pt") if not f.name.endswith(".state.pt"))
        if not found:
            continue
        if similarity is not None:
            chosen = candidate / f"registration_{similarity}.pt"
            if not chosen.is_file():
                raise CheckpointError(f"{candidate}: no registration_{similarity}.pt; found {[p.name for p in found]}")
            return chosen
        if len(found) > 1:
            raise ConfigError(f"{candidate} holds {len(found)} registration models "
                              f"({', '.join(p.name for p in found)}); choose one with --similarity")
        return found[0]
    raise CheckpointError(f"{folder}: no registration_*.pt in it or in its models/ folder")


def _from_mlflow(spec: str, tracking_uri: str | None, similarity: str | None) -> Path:
    """Download the run's ``checkpoint/`` artifacts into a temporary folder (removed when the process exits, or at
    once if the download fails). An unreachable server is a one-line error within seconds."""
    import atexit
    import os
    import shutil

    import mlflow

    from deepsim.tracking.mlflow_tracking import check_store

    run_id = spec[len("runs:/"):].strip("/").split("/")[0] if spec.startswith("runs:/") else spec
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    check_store(uri)
    if uri.startswith("http"):  # one retry, 10 s per request: MLflow's defaults wait minutes on a dead server
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    target = Path(tempfile.mkdtemp(prefix="deepsim-model-"))
    try:
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(target))
    except Exception as exc:  # MlflowException for unknown runs, OSError for unreachable servers, ...
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"MLflow run {run_id} (tracking URI {uri}): cannot download its checkpoint artifacts "
                              f"({type(exc).__name__}: {first_line(exc)})") from exc
    atexit.register(shutil.rmtree, target, True)
    return _from_folder(Path(folder), similarity)


def _from_mlflow_model(spec: str, tracking_uri: str | None, similarity: str | None) -> Path:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    target = Path(tempfile.mkdtemp(prefix="deepsim-model-"))
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(target)))
    except Exception as exc:  # MlflowException for unknown names/versions/aliases, OSError for unreachable servers
        raise CheckpointError(f"MLflow model {spec} (tracking URI {mlflow.get_tracking_uri()}): cannot download it "
                              f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from exc
    if not (folder / "extra_files").is_dir():
        raise CheckpointError(f"MLflow model {spec}: no extra_files/ with a deepsim checkpoint in it (was it logged "
                              "by deepsim?)")
    return _from_folder(folder / "extra_files", similarity)


def _spacing(path: Path, meta: dict, spacing_mm: float | None) -> float:
    if spacing_mm is not None:
        return float(spacing_mm)
    if "spacing_mm" in meta:
        return float(meta["spacing_mm"])
    datalist = Path(str(meta.get("datalist", "")))
    if datalist.is_file():  # checkpoints from before the spacing was stored: the training datalist records it
        return float(json.loads(datalist.read_text())["spacing_mm"])
    raise CheckpointError(f"{path}: the checkpoint does not record its training spacing; pass --spacing")


def resolve_model(spec: str | Path | None = None, device: torch.device | str = "cpu", similarity: str | None = None,
                  tracking_uri: str | None = None, spacing_mm: float | None = None) -> RegistrationModel:
    """Load the registration model ``spec`` names (see the module docstring) onto ``device``, in eval mode."""
    if spec is None or str(spec) == "":
        path = _from_folder(default_model_dir(), similarity)
    else:
        text = str(spec)
        candidate = Path(text).expanduser()
        if candidate.is_file():
            path = candidate
        elif candidate.is_dir():
            path = _from_folder(candidate, similarity)
        elif text.startswith("runs:/") or _RUN_ID.match(text):
            path = _from_mlflow(text, tracking_uri, similarity)
        elif text.startswith("models:/"):
            path = _from_mlflow_model(text, tracking_uri, similarity)
        else:
            raise CheckpointError(f"{text}: no such checkpoint, folder, MLflow run (runs:/<id> or a 32-hex run id) "
                                  "or MLflow model (models:/<name>/<version> or models:/<name>@<alias>)")
    payload = load_checkpoint(path)
    if payload["builder"] != "registration_net":
        raise CheckpointError(f"{path}: a {payload['builder']} checkpoint, not a registration network")
    meta = dict(payload.get("meta", {}))
    network = load_network(path, map_location=device).to(device).eval()
    weight = meta.get("regularization_weight")
    return RegistrationModel(network=network, checkpoint=path, spacing_mm=_spacing(path, meta, spacing_mm),
                             similarity=meta.get("similarity"),
                             regularization_weight=None if weight is None else float(weight), meta=meta)


def from_weights(network: torch.nn.Module, weights: str | Path, spacing_mm: float, similarity: str | None = None,
                 regularization_weight: float | None = None,
                 device: torch.device | str = "cpu") -> RegistrationModel:
    """A model in MONAI's bundle form: the network a bundle's ``network_def`` builds, and a plain state dict file
    (``models/model.pt``), read with ``weights_only=True`` and loaded with ``strict=True``. ``spacing_mm`` and the
    loss (for instance optimisation) come from the bundle's config, as the file holds weights only."""
    weights = Path(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights}: weights file not found") from exc
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"{weights}: not a readable state dict ({load_failure(exc)})") from exc
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = describe_mismatch(network, state) if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"{weights}: weights do not match the bundle's network_def ({detail})") from exc
    weight = None if regularization_weight is None else float(regularization_weight)
    return RegistrationModel(network=network.to(device).eval(), checkpoint=weights, spacing_mm=float(spacing_mm),
                             similarity=similarity, regularization_weight=weight, meta={"weights": str(weights)})
