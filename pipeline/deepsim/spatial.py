"""The one spatial convention of deepsim: displacement fields, warping, voxel <-> millimetre.

Inside the package a displacement field ``ddf`` is a tensor ``(B, ndim, *spatial)`` in **voxels** of the fixed
image's grid; channel ``i`` is the displacement along tensor spatial axis ``i``. Warping pulls back:
``warped[x] = moving[x + u(x)]`` (MONAI ``Warp``, ``align_corners=True``), so ``phi = id + u`` maps fixed-grid
voxels into the moving image. Fields written to files are in millimetres of world space (see
:func:`ddf_voxel_to_world`), never voxels.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Warp

__all__ = ["CachedGridWarp", "warp_image", "warp_labels", "warp_onehot", "ddf_voxel_to_world", "ddf_world_to_voxel",
           "identity_grid"]


class CachedGridWarp(Warp):
    """MONAI's ``Warp`` with a reference grid that is really cached, and built on the field's device.

    MONAI 1.6.1's ``Warp.get_reference_grid`` compares the cached grid's ``shape[1:]`` (ndim, *S) with
    ``ddf.shape[2:]`` (*S), which never match: every call builds the grid on the host (int64 meshgrid) and copies it
    to the device, 83 MB per call for a 160×192×224 field. On an H200 that host work and copy made our training step
    CPU-bound (``benchmarks/profile_step.py``). Here the grid is kept per (spatial shape, device, dtype) and made
    directly on the device; it has batch size 1 and broadcasts over the batch. The warp itself is MONAI's.

    While ``torch.export`` or ``torch.jit.trace`` records the network, the grid is built inside the graph instead:
    a cached tensor would be baked in as a constant of one shape (export then fails on its shape guard).
    """

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        if jitter:
            return super().get_reference_grid(ddf, jitter, seed)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return self._grid(ddf)
        key = (tuple(ddf.shape[2:]), ddf.device, ddf.dtype)
        if self.ref_grid is None or getattr(self, "_grid_key", None) != key:
            self.ref_grid = self._grid(ddf)
            self._grid_key = key
        return self.ref_grid

    @staticmethod
    def _grid(ddf: torch.Tensor) -> torch.Tensor:
        axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in ddf.shape[2:]]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


_bilinear_warp = CachedGridWarp(mode="bilinear", padding_mode="border")
_nearest_warp = CachedGridWarp(mode="nearest", padding_mode="zeros")


def _check_pair(image: torch.Tensor, ddf: torch.Tensor) -> None:
    ndim = ddf.shape[1]
    if ddf.ndim != ndim + 2:
        raise ValueError(f"ddf must have shape (B, ndim, *spatial); got {tuple(ddf.shape)}")
    if image.ndim != ddf.ndim or image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must share batch layout and spatial size"
        )


def warp_image(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Trilinear (bilinear in 2D) pull-back warp. image: (B, C, *S), ddf: (B, ndim, *S) voxels -> (B, C, *S).

    The field is cast to float32 first: under bf16/fp16 autocast the sampling grid would be quantised.
    Outside the image the border value is repeated.
    """
    _check_pair(image, ddf)
    return _bilinear_warp(image.float(), ddf.float()).to(image.dtype)


def warp_labels(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map; label values are preserved exactly, whatever their size.

    labels: (B, C, *S) integer (C is usually 1), ddf: (B, ndim, *S) voxels -> (B, C, *S) with the dtype of
    ``labels``. The sampling positions ``x + u(x)`` are rounded (half to even, as ``grid_sample``'s nearest mode) in
    float64 and the labels are gathered in their own dtype, never converted through floats: uint32 and int64 values
    above 2**31 (or 2**53) come back exactly. Outside the image: 0. Has no useful gradient: use :func:`warp_onehot`
    for training with labels.
    """
    _check_pair(labels, ddf)
    spatial = tuple(labels.shape[2:])
    ndim, batch, channels = len(spatial), labels.shape[0], labels.shape[1]
    view = (1, ndim, *[1] * ndim)
    index = torch.round(identity_grid(spatial, ddf.device).double()[None] + ddf.double()).long()
    upper = torch.tensor(spatial, device=ddf.device).view(view) - 1
    inside = ((index >= 0) & (index <= upper)).all(dim=1, keepdim=True)  # (B, 1, *S)
    index = torch.minimum(index.clamp_min(0), upper)
    flat = index[:, 0]
    for axis in range(1, ndim):
        flat = flat * spatial[axis] + index[:, axis]
    flat = flat.reshape(flat.shape[0], 1, -1).expand(batch, channels, -1)
    # gather copies bits: unsigned types torch cannot gather travel as the signed type of the same width
    work = labels.view(_SIGNED_TWIN.get(labels.dtype, labels.dtype))
    out = torch.gather(work.reshape(batch, channels, -1), 2, flat).reshape(labels.shape)
    out = torch.where(inside, out, torch.zeros((), dtype=work.dtype, device=work.device))
    return out.view(labels.dtype)


_SIGNED_TWIN = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def warp_onehot(onehot: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Differentiable warp of a one-hot/probabilistic label map (B, K, *S): bilinear, channels still sum to 1."""
    _check_pair(onehot, ddf)
    return _bilinear_warp(onehot.float(), ddf.float())


def _apply_linear(ddf: torch.Tensor, affine: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Multiply every displacement vector by the linear part of ``affine`` (or its inverse).

    The matrix is inverted in float64; the product runs in the field's own precision (float32 fields stay float32:
    a 3x3 product loses ~1e-7 relative, and a float64 copy of a 1 mm brain field costs 170 MB and time)."""
    ndim = ddf.shape[1]
    linear = torch.as_tensor(affine, dtype=torch.float64, device=ddf.device)[:ndim, :ndim]
    if inverse:
        linear = torch.linalg.inv(linear)
    dtype = ddf.dtype if ddf.is_floating_point() else torch.float64
    return torch.einsum("ij,bj...->bi...", linear.to(dtype), ddf.to(dtype))


def ddf_voxel_to_world(ddf: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Convert a displacement from voxels to millimetres in the world frame of ``affine``.

    ddf: (B, ndim, *S) voxels; affine: (ndim+1, ndim+1) voxel -> world (RAS for NIfTI) -> (B, ndim, *S) mm.
    A displacement is a difference of positions, so only the linear part of the affine applies.
    """
    return _apply_linear(ddf, affine, inverse=False)


def ddf_world_to_voxel(ddf_mm: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ddf_voxel_to_world`: (B, ndim, *S) mm in the world frame of ``affine`` -> voxels."""
    return _apply_linear(ddf_mm, affine, inverse=True)


def identity_grid(shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Voxel coordinates of a grid: (ndim, *shape), channel i is the index along axis i (float32)."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
