"""Several moving images registered to one fixed image at once: a :class:`~.pipeline.Registrar`'s stages on a batch.

When every pair shares its fixed image (a study registered to a template), every pair also shares the working grid,
so the network and the instance optimisation take the moving images as one batch ``(B, 1, *G)``, one kernel launch
for all of them. The stages are the Registrar's own (its affine, network and optimiser objects, with their
settings); only their order over a batch lives here:

1. the affine stage, pair by pair (each moving image has its own grid);
2. each moving image resampled onto the working grid through its affine;
3. the network on the batch; 4. instance optimisation on the batch (one pyramid, all pairs stepping together; a
   level ends on the plateau of the batch's mean loss).

Each pair comes back as the :class:`~.pipeline.Registration` that ``registrar(fixed, ..., moving, ...)`` returns,
so whatever consumes one (``target_points``, ``voxel_ddf``) works unchanged. ``timings`` of a batched stage are the
batch's seconds divided by its size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from deepsim.geometry import Grid, resample_onto
from deepsim.registration.instance import InstanceResult
from deepsim.registration.pipeline import Registrar, Registration

__all__ = ["register_batch"]


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register_batch(registrar: Registrar, fixed: torch.Tensor, fixed_affine: np.ndarray,
                   movings: Sequence[tuple[torch.Tensor, np.ndarray]], progress: bool = False) -> list[Registration]:
    """Register every ``(moving (*S'), moving_affine)`` of ``movings`` to ``fixed`` (*S) with ``registrar``'s
    stages (module docstring). Intensities scaled to about [0, 1], all on ``fixed``'s device."""
    if not movings:
        return []
    device = fixed.device
    size = len(movings)
    fixed_grid = Grid(tuple(int(n) for n in fixed.shape), np.asarray(fixed_affine, dtype=np.float64))
    grid = registrar.working_grid(fixed_grid)
    timings = [dict() for _ in movings]
    matrices, affine_results, m_work = [], [], []
    f_work = resample_onto(fixed.float(), fixed_affine, grid, box=fixed_grid)
    for i, (moving, moving_affine) in enumerate(movings):
        t0 = time.perf_counter()
        result, matrix = None, np.eye(4)
        if registrar.affine is not None:
            result = registrar.affine(fixed, fixed_affine, moving, moving_affine)
            matrix = result.matrix
        _synchronise(device)
        t1 = time.perf_counter()
        m_work.append(resample_onto(moving.float(), moving_affine, grid, box=fixed_grid,
                                    transform=None if registrar.affine is None else matrix))
        _synchronise(device)
        timings[i].update(affine_s=t1 - t0, resample_s=time.perf_counter() - t1)
        matrices.append(matrix)
        affine_results.append(result)
    moving_batch = torch.stack(m_work)[:, None]
    fixed_batch = f_work[None, None].expand(size, 1, *grid.shape)

    t0 = time.perf_counter()
    ddf = None
    if registrar.network is not None:
        with torch.no_grad():
            ddf = registrar.network(moving_batch, fixed_batch.contiguous()).float()
    _synchronise(device)
    network_s = (time.perf_counter() - t0) / size

    t0 = time.perf_counter()
    instance, inverse = None, None
    if registrar.optimiser is not None:
        instance = registrar.optimiser(moving_batch, fixed_batch, ddf, progress=progress)
        ddf, inverse = instance.ddf, instance.inverse_ddf
    if ddf is None:
        ddf = inverse = torch.zeros(size, grid.ndim, *grid.shape, device=device)
    _synchronise(device)
    instance_s = (time.perf_counter() - t0) / size

    out = []
    for i in range(size):
        timings[i].update(network_s=network_s, instance_optimisation_s=instance_s, batch_size=size)
        # a missing inverse (greedy, or a network's field alone) is computed when asked for (Registration.inverse)
        own_inverse = None if inverse is None else inverse[i:i + 1]
        own = None if instance is None else InstanceResult(instance.ddf[i:i + 1], own_inverse, instance.field[i:i + 1],
                                                           instance.losses, instance.steps, instance.seconds / size)
        out.append(Registration(matrices[i], ddf[i:i + 1], grid, timings[i], affine_results[i], own, own_inverse))
    return out
