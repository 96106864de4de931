"""ANTs SyN through antspyx, as a peer on our pairs (affine with Mattes MI, then SyN with CC or Mattes MI)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from deepsim.peers.tools import require, tool_params

__all__ = ["AntsSyN"]


@dataclass(frozen=True)
class AntsSyN:
    """ANTs: affine (Mattes MI) then SyN, through ``ants.registration(type_of_transform="SyN")``.

    ``syn_metric``: ``"CC"`` (local cross-correlation, one contrast; the default) or ``"mattes"`` (Mattes mutual
    information, images of different contrasts). ``syn_sampling`` is the CC radius in voxels, or the number of
    histogram bins for ``"mattes"`` (antspyx's meaning of the argument; 32 is its default); ``reg_iterations`` the
    SyN iterations per level (coarse to fine, shrink factors 4, 2, 1 by antspyx's defaults for three levels);
    ``grad_step``, ``flow_sigma``, ``total_sigma`` the SyN step and the update/total field smoothing (voxels).
    ``random_seed`` fixes ANTs' metric sampling.
    """

    aff_metric: str = "mattes"
    syn_metric: str = "CC"
    syn_sampling: int = 2
    reg_iterations: tuple[int, ...] = (40, 20, 0)
    grad_step: float = 0.2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0
    random_seed: int = 1
    name: str = "ants-syn"

    def __post_init__(self) -> None:
        if self.syn_metric not in ("CC", "mattes"):
            raise ValueError(f"syn_metric must be 'CC' or 'mattes', got {self.syn_metric!r}")

    def params(self) -> dict:
        return tool_params(self)

    def __call__(self, fixed: np.ndarray, moving: np.ndarray, spacing_mm: float) -> np.ndarray:
        ants = require("ants", "antspyx")
        spacing = (float(spacing_mm),) * fixed.ndim
        f = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=spacing)
        m = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=spacing)
        workdir = tempfile.mkdtemp(prefix="deepsim-ants-")
        try:
            result = ants.registration(f, m, type_of_transform="SyN", aff_metric=self.aff_metric,
                                       syn_metric=self.syn_metric, syn_sampling=self.syn_sampling,
                                       reg_iterations=self.reg_iterations, grad_step=self.grad_step,
                                       flow_sigma=self.flow_sigma, total_sigma=self.total_sigma,
                                       random_seed=self.random_seed, outprefix=f"{workdir}/reg_")
            # affine + warp composed into one displacement field on the fixed grid (physical = voxels x spacing)
            composite = ants.apply_transforms(f, m, transformlist=result["fwdtransforms"],
                                              compose=f"{workdir}/composite_")
            field = ants.image_read(composite).numpy()  # (*S, ndim), components along the array axes, mm
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return np.moveaxis(field, -1, 0).astype(np.float32) / float(spacing_mm)
