"""FireANTs (greedy diffeomorphic registration in PyTorch, GPU), as a peer on our pairs."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from deepsim.peers.tools import require, tool_params

__all__ = ["FireANTs"]


@dataclass(frozen=True)
class FireANTs:
    """FireANTs 1.5 (Jena et al., 2024): affine, then greedy diffeomorphic registration with compositive updates, on
    the GPU when there is one (``device``), with the settings of its own brain benchmark script
    (``fireants/scripts/pairwise/test_lpba40.py``): affine on shrink 8, 4, 2, 1 for 100, 50, 25, 20 Adam steps
    (lr 3e-4, local CC over 5 voxels); greedy on shrink 4, 2, 1 for 200, 100, 50 steps (lr 0.5, CC over 7 voxels,
    gradient σ 2, warp σ 0.5 voxels). Images go in through SimpleITK, as FireANTs reads them; its ``"cc"`` loss
    (the fused CUDA kernels are a separate build, not on PyPI).

    ``loss_type`` is the metric of both stages: ``"cc"`` (local CC, one contrast) or ``"mi"`` (FireANTs' global
    mutual information, Gaussian Parzen windows with ``mi_bins`` bins on [0, 1]: images of different contrasts;
    our images are in [0, 1]). The kernel sizes apply to ``"cc"`` only.
    """

    affine_scales: tuple[int, ...] = (8, 4, 2, 1)
    affine_iterations: tuple[int, ...] = (100, 50, 25, 20)
    affine_lr: float = 3e-4
    affine_cc_kernel: int = 5
    scales: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (200, 100, 50)
    cc_kernel: int = 7
    smooth_grad_sigma: float = 2.0
    smooth_warp_sigma: float = 0.5
    lr: float = 0.5
    loss_type: str = "cc"
    mi_bins: int = 32
    device: str = ""
    name: str = "fireants"

    def __post_init__(self) -> None:
        if self.loss_type not in ("cc", "mi"):
            raise ValueError(f"loss_type must be 'cc' or 'mi', got {self.loss_type!r}")

    def params(self) -> dict:
        return tool_params(self)

    def __call__(self, fixed: np.ndarray, moving: np.ndarray, spacing_mm: float) -> np.ndarray:
        import logging

        sitk = require("SimpleITK", "SimpleITK")
        require("fireants", "fireants")
        import torch

        logging.getLogger("fireants").setLevel(logging.WARNING)  # an INFO line per level and stage otherwise
        with contextlib.redirect_stdout(io.StringIO()):  # its import prints three "FFO" lines onto our stdout
            from fireants.io.image import BatchedImages, Image
            from fireants.registration.affine import AffineRegistration
            from fireants.registration.greedy import GreedyRegistration

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ndim = fixed.ndim

        def batch(array: np.ndarray):
            # GetImageFromArray reads the array's axes as (z, y, x) and FireANTs reads them back the same way, so its
            # tensor axes are ours; isotropic spacing, identity direction, zero origin
            image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
            image.SetSpacing([float(spacing_mm)] * ndim)
            return BatchedImages([Image(image, device=device)])

        f, m = batch(fixed), batch(moving)
        loss = {"loss_type": self.loss_type}
        if self.loss_type == "mi":
            loss["loss_params"] = {"num_bins": self.mi_bins}
        affine = AffineRegistration(list(self.affine_scales), list(self.affine_iterations), f, m, **loss,
                                    optimizer="Adam", optimizer_lr=self.affine_lr, cc_kernel_size=self.affine_cc_kernel,
                                    progress_bar=False)
        affine.optimize()
        greedy = GreedyRegistration(scales=list(self.scales), iterations=list(self.iterations), fixed_images=f,
                                    moving_images=m, **loss, cc_kernel_size=self.cc_kernel,
                                    deformation_type="compositive", smooth_grad_sigma=self.smooth_grad_sigma,
                                    smooth_warp_sigma=self.smooth_warp_sigma, optimizer="adam", optimizer_lr=self.lr,
                                    init_affine=affine.get_affine_matrix().detach(), progress_bar=False)
        greedy.optimize()
        with torch.no_grad():
            grid = greedy.get_warped_coordinates(f, m)[0]  # (*S, ndim): normalised, x (last tensor axis) first
            shape = torch.tensor(fixed.shape, dtype=grid.dtype, device=grid.device)
            voxel = (grid.flip(-1) + 1.0) * (shape - 1) / 2.0  # our tensor-axis order, voxel units
            index = torch.stack(torch.meshgrid(*[torch.arange(n, device=grid.device, dtype=grid.dtype)
                                                 for n in fixed.shape], indexing="ij"), dim=-1)
            ddf = (voxel - index).movedim(-1, 0)
        return ddf.float().cpu().numpy()
