"""Export a registration network with ``torch.export``: a graph that runs without deepsim's Python code.

The exported program keeps the network's two-input call, ``program.module()(moving, fixed) -> ddf``
(or the one-input call on the stacked pair with ``stacked=True``), and its spatial sizes stay free: every spatial
axis may be any multiple of the network's ``size_multiple`` up to ``max_size``. Scaling and squaring (the
diffeomorphic option) is exported too. Save with ``torch.export.save(program, "registration.pt2")``, load with
``torch.export.load`` (no pickled Python objects).

TorchScript is not the path here: ``torch.jit.script`` stops at MONAI's ``Warp``, and a trace (MONAI's
``ckpt_export --use_trace``) fixes one input shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from deepsim.engine.distributed import unwrap

__all__ = ["export_registration", "save_registration", "load_exported"]


def export_registration(network: nn.Module, example_size: int | None = None, max_size: int = 1024,
                        stacked: bool = False) -> ExportedProgram:
    """``torch.export`` of a :class:`~deepsim.registration.network.RegistrationNet` with free spatial sizes.

    ``example_size``: the side of the cubic (square) example pair used for tracing (default: twice the network's
    ``size_multiple``); ``max_size``: the largest spatial size the program accepts. The network is exported in eval
    mode on the CPU; move the loaded program's module to a device as usual.
    """
    network = unwrap(network).eval().cpu()
    multiple = int(getattr(network, "size_multiple", 1))
    ndim = int(network.spatial_dims)
    channels = int(network.in_channels)
    side = example_size or 2 * multiple
    if side % multiple:
        raise ValueError(f"example_size must be a multiple of {multiple} for this network, got {side}")
    # each spatial axis: a free multiple of size_multiple (Dim names must be unique per axis)
    steps = {axis: Dim(f"n{axis}", min=1, max=max(1, max_size // multiple)) for axis in range(2, ndim + 2)}
    axes = {axis: multiple * step for axis, step in steps.items()}
    batch = Dim("batch", min=1, max=1024)
    # batch 2 in the example: torch.export specialises sizes of 1 to constants
    image = torch.zeros((2, 2 * channels if stacked else channels, *[side] * ndim))
    shapes = {0: batch, **axes}
    with torch.no_grad():
        if stacked:
            return torch.export.export(network, (image,), dynamic_shapes=({**shapes},))
        return torch.export.export(network, (image, image.clone()), dynamic_shapes=({**shapes}, {**shapes}))


def save_registration(network: nn.Module, path: str | Path, **options) -> Path:
    """Export ``network`` (see :func:`export_registration`) and write it to ``path`` (``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_registration(network, **options), str(path))
    return path


def load_exported(path: str | Path) -> nn.Module:
    """The callable module of a saved program: ``load_exported(p)(moving, fixed) -> ddf``."""
    return torch.export.load(str(path)).module()
