"""Trained networks as MLflow models (``mlflow.pytorch`` flavor) and the registered model of a pipeline run.

Every feature and registration network a tracked stage trains is logged into its run as an MLflow model with a
signature and an input example: ``mlflow.pytorch.load_model(uri)`` returns the network, and
``mlflow.pyfunc.load_model(uri).predict(array)`` runs it. A registration network's one input is the pair stacked
on the channel axis, ``(B, 2, *S)``, moving first (its one-input call, see
:class:`~deepsim.registration.network.RegistrationNet`), its output the displacement field ``(B, ndim, *S)`` in
voxels. Our own checkpoint travels inside the model (``extra_files/registration_<loss>.pt``, and for a DeepSim loss
its ``feature_<kind>.pt``), so ``deepsim register --model models:/<name>/<version>`` loads it safely
(``weights_only=True``) with the spacing and loss it was trained with.

The module is stored pickled (MLflow's ``serialization_format="pickle"``), so ``mlflow.pytorch.load_model`` returns
the network itself, for any input size, with its two-input call and, for feature nets, ``features()``; it needs
``deepsim`` installed and, like any pickle, a source you trust. MLflow's default here, "pt2", re-exports the
network with ``torch.export`` from the input example and fixed sizes it cannot infer from a small example (a
16-voxel example pinned the U-Net's bottleneck to one voxel); :mod:`deepsim.registration.export` is our export.

``deepsim run`` registers the registration network with the best final validation Dice in the Model Registry as
``deepsim-<experiment>`` and points the alias ``best`` at that version.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALIAS", "log_network_model", "logged_candidates", "register_best", "registered_name", "signature_of"]

#: the alias ``deepsim run`` moves to the version it registers
ALIAS = "best"


def registered_name(experiment: str) -> str:
    """The Model Registry name of a pipeline's registration networks: ``deepsim-<experiment>``."""
    return f"deepsim-{experiment}"


def signature_of(network: Any, builder: str) -> tuple[Any, np.ndarray]:
    """``(ModelSignature, input example)`` of a deepsim network: tensors with free batch and spatial sizes.

    The example is the smallest input the network accepts (each side its ``size_multiple``, zeros)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    ndim = int(network.spatial_dims)
    free = (-1,) * ndim
    if builder == "registration_net":
        channels, side = 2 * int(network.in_channels), int(network.size_multiple)
        out = TensorSpec(np.dtype(np.float32), (-1, ndim, *free))
    else:
        encoder = network.encoder.stages
        channels, side = int(encoder[0][0].in_channels), 2 ** len(encoder)
        classes = getattr(network, "head").out_channels
        out = TensorSpec(np.dtype(np.float32), (-1, int(classes), *free))
    # unnamed: a named tensor makes MLflow's serving-input check call the PyTorch flavor with a dict, which it refuses
    inputs = TensorSpec(np.dtype(np.float32), (-1, channels, *free))
    example = np.zeros((1, channels, *[side] * ndim), dtype=np.float32)
    return ModelSignature(inputs=Schema([inputs]), outputs=Schema([out])), example


def _requirements() -> list[str]:
    """What loading the pickled module needs (given explicitly: MLflow's inference of them loads the model in a
    subprocess, seconds per model). deepsim is not on PyPI: install it from its repository."""
    import monai
    import torch

    from deepsim import __version__

    return [f"deepsim=={__version__}", f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"]


def log_network_model(checkpoint: str | Path, name: str, extra: Sequence[str | Path] = (),
                      metadata: Mapping[str, Any] | None = None) -> Any:
    """Log the network of a deepsim checkpoint into the active run as MLflow model ``name``; returns MLflow's
    ``ModelInfo`` (its ``model_uri`` is ``models:/<model id>``).

    The checkpoint and ``extra`` files (e.g. the feature net a DeepSim loss needs) are stored in the model's
    ``extra_files/``; the checkpoint's training facts (spacing, loss, λ, final metrics) become model metadata."""
    import logging

    import mlflow

    from deepsim.engine.checkpoints import load_checkpoint, load_network

    payload = load_checkpoint(checkpoint)
    network = load_network(checkpoint).eval()
    signature, example = signature_of(network, payload["builder"])
    facts = {k: v for k, v in payload.get("meta", {}).items() if isinstance(v, (int, float, str, bool))}
    flavor_log = logging.getLogger("mlflow.pytorch")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)  # its warning about pickles, once per model: said once, in the docs above
    try:
        return mlflow.pytorch.log_model(
            network, name=name, signature=signature, input_example=example, serialization_format="pickle",
            extra_files=[str(checkpoint), *[str(p) for p in extra if Path(p).is_file()]],
            pip_requirements=_requirements(),
            metadata={"deepsim_builder": payload["builder"], "deepsim_checkpoint": Path(checkpoint).name, **facts,
                      **dict(metadata or {})},
        )
    finally:
        flavor_log.setLevel(level)


def logged_candidates(run_ids: Mapping[str, str], models_dir: str | Path) -> dict[str, tuple[str, float]]:
    """loss -> (``models:/<model id>`` its registration run logged, final validation Dice of its checkpoint)."""
    import mlflow

    from deepsim.engine.checkpoints import load_checkpoint

    client = mlflow.MlflowClient()
    candidates = {}
    for loss, run_id in run_ids.items():
        outputs = client.get_run(run_id).outputs.model_outputs if run_id else []
        if outputs:
            meta = load_checkpoint(Path(models_dir) / f"registration_{loss}.pt").get("meta", {})
            candidates[loss] = (f"models:/{outputs[-1].model_id}", float(meta.get("val/dice", float("nan"))))
    return candidates


def register_best(candidates: Mapping[str, tuple[str, float]], experiment: str) -> tuple[str, str, str] | None:
    """Register the best of ``candidates`` (loss -> (model URI, validation Dice)) as a new version of
    ``deepsim-<experiment>`` and move the alias :data:`ALIAS` to it.

    Returns ``(loss, "models:/<name>/<version>", "models:/<name>@best")``, or None without candidates."""
    import mlflow

    usable = {loss: (uri, dice) for loss, (uri, dice) in candidates.items() if uri and dice == dice}
    if not usable:
        return None
    loss = max(usable, key=lambda k: usable[k][1])
    uri, dice = usable[loss]
    name = registered_name(experiment)
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered ..." lines itself
        version = mlflow.register_model(uri, name, tags={"similarity": loss, "val_dice": f"{dice:.4f}"})
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version.version)
    return loss, f"models:/{name}/{version.version}", f"models:/{name}@{ALIAS}"
