"""A real T1 and a known deformation: endpoint error and time of our stages, ANTs SyN and FireANTs.

The fixed image is the ICBM152 2009 T1 template shipped inside the ``nilearn`` wheel (real MRI contrast, 1 mm,
skull removed with the template's own grey+white matter maps). The moving image is the same brain pushed through a
known smooth deformation (random, about 4 mm RMS inside the brain, invertible), multiplied by a smooth bias field
(±20 %) and given Gaussian noise (2 % of the intensity range). Every method registers moving to fixed; the endpoint
error is the distance between its displacement and the true one at the brain's voxels (mm).

    pip install nilearn            # only its data files are read
    python benchmarks/real_t1_check.py --out /tmp/real_t1 --table benchmarks/results/real_t1_check.md

Ours run through ``deepsim register`` (``register_files``) with the shipped model: the network alone, the affine
stage, affine + instance optimisation, and the default path (affine, network, optimisation). ANTs SyN and FireANTs
(the ``compare`` extra) get the same arrays. ``--spacing 2`` runs everything at 2 mm (a quarter of the voxels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi


TEMPLATE_FILES = [f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")]


def _template(folder: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 in [0, 1] with the skull removed, brain mask, affine) of nilearn's ICBM152 2009 template, read from
    ``folder`` (a copy of the three files) or from the installed nilearn wheel."""
    if folder is None:
        spec = importlib.util.find_spec("nilearn")
        if spec is None:
            raise SystemExit("nilearn is not installed: pip install nilearn (only its data files are read)")
        folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    t1 = nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    mask = ndi.binary_fill_holes(ndi.binary_closing(gm + wm > 0.3, iterations=2))
    image = np.asarray(t1.dataobj, dtype=np.float32) * mask
    return image / np.percentile(image[mask], 99.5), mask, t1.affine


def _resample(image: np.ndarray, affine: np.ndarray, spacing: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    if spacing == 1.0:
        return image, affine
    zoom = np.linalg.norm(affine[:3, :3], axis=0) / spacing
    out = ndi.zoom(image.astype(np.float32), zoom, order=order)
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] / zoom
    return out, new


def _known_deformation(mask: np.ndarray, spacing: float, rms_mm: float, seed: int) -> np.ndarray:
    """(3, *S) smooth displacement in voxel units of the grid, scaled to ``rms_mm`` RMS inside ``mask``."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndi.gaussian_filter(rng.standard_normal(mask.shape), 16.0 / spacing) for _ in range(3)])
    field *= (rms_mm / spacing) / np.sqrt((field[:, mask] ** 2).sum(0).mean())
    return field.astype(np.float32)


def _moving(fixed: np.ndarray, d_vox: np.ndarray, seed: int, bias: float = 0.2, noise: float = 0.02) -> np.ndarray:
    """moving with moving(x + d(x)) = fixed(x): fixed read through the inverse map (fixed-point iteration), times a
    smooth bias field of ±``bias``, plus Gaussian noise of sd ``noise`` inside the image."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in fixed.shape], indexing="ij"))
    x = index.copy()
    for _ in range(30):  # solve x + d(x) = y for every grid point y
        x = index - np.stack([ndi.map_coordinates(c, x, order=1, mode="nearest") for c in d_vox])
    moving = ndi.map_coordinates(fixed, x, order=1, mode="constant")
    rng = np.random.default_rng(seed + 1)
    field = ndi.gaussian_filter(rng.standard_normal(fixed.shape), 30.0)
    field = 1.0 + bias * field / np.abs(field).max()
    noisy = moving * field + rng.normal(0.0, noise, fixed.shape) * (moving > 0)
    return np.clip(noisy, 0, None).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", type=Path, default=None)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--rms-mm", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="registration model (default: the shipped brain model)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="rows.json files of other runs (e.g. ANTs on a CPU) to put in the same table")
    parser.add_argument("--template-dir", type=Path, default=None,
                        help="a folder holding the three ICBM152 files (default: the installed nilearn's)")
    parser.add_argument("--methods", nargs="+", default=["identity", "network-only", "affine", "affine+io",
                                                         "default", "default, 100/60/50 steps", "ants-syn",
                                                         "fireants"])
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sitk_standin import install

    install()  # FireANTs reads arrays through it where SimpleITK is missing (the GPU machine)
    from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian
    from deepsim.io import load_displacement, save_volume
    from deepsim.peers import CLASSICAL_METHODS
    from deepsim.registration.inference import register_files

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    image, mask, affine = _template(args.template_dir)
    image, grid_affine = _resample(image, affine, args.spacing, 1)
    mask = _resample(mask.astype(np.float32), affine, args.spacing, 1)[0] > 0.5
    d_vox = _known_deformation(mask, args.spacing, args.rms_mm, args.seed)
    moving = _moving(image, d_vox, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    fixed_path = save_volume(args.out / "fixed.nii.gz", image, grid_affine)
    moving_path = save_volume(args.out / "moving.nii.gz", moving, grid_affine)
    d_mm = np.einsum("ij,j...->i...", grid_affine[:3, :3], d_vox)
    if args.device.startswith("cuda"):  # CUDA start-up and cuDNN autotuning stay out of the timings
        register_files(fixed_path, moving_path, args.out / "warmup", model=args.model, device=args.device,
                       progress=False)
    rows = []
    stages = {"network-only": dict(affine=False, iterations=0), "affine": dict(network=False, iterations=0),
              "affine+io": dict(network=False), "default": {},
              "default, 100/60/50 steps": dict(iterations=(100, 60, 50))}
    for method in args.methods:
        started = time.perf_counter()
        if method == "identity":
            ddf_mm = np.zeros_like(d_mm)
        elif method in stages:
            written = register_files(fixed_path, moving_path, args.out / method, model=args.model, device=args.device,
                                     progress=False,
                                     spacing_mm=args.spacing if not stages[method].get("network", True) else None,
                                     **stages[method])
            ddf_mm = load_displacement(written["ddf_mm"])[0]
        elif method in CLASSICAL_METHODS:
            options = {"device": args.device} if method == "fireants" else {}
            tool = CLASSICAL_METHODS[method](**options)
            ddf_vox = tool(image, moving, args.spacing)
            ddf_mm = np.einsum("ij,j...->i...", grid_affine[:3, :3], ddf_vox)
        else:
            raise SystemExit(f"unknown method {method}")
        seconds = time.perf_counter() - started
        error = np.linalg.norm(ddf_mm - d_mm, axis=0)[mask]
        ddf_vox = np.einsum("ij,j...->i...", np.linalg.inv(grid_affine[:3, :3]), ddf_mm)
        det = jacobian_determinant(torch.as_tensor(ddf_vox, dtype=torch.float32)[None])[0]
        rows.append({"method": method, "epe_mean_mm": float(error.mean()),
                     "epe_p95_mm": float(np.percentile(error, 95)),
                     "folding_pct": folding_percent(det, torch.as_tensor(mask)),
                     "std_logjac": std_log_jacobian(det, torch.as_tensor(mask)), "seconds": seconds})
        rows[-1]["device"] = "cpu" if method == "ants-syn" else args.device
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    for other in args.merge:
        rows += json.loads(other.read_text())
    lines = [
        "# A real T1 with a known deformation: endpoint error per method", "",
        f"Command: `python benchmarks/real_t1_check.py --out <folder> --spacing {args.spacing:g} --rms-mm "
        f"{args.rms_mm:g} --seed {args.seed}` on {platform.machine()} ({args.device}, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}.", "",
        f"Fixed: nilearn's ICBM152 2009 T1 at {args.spacing:g} mm, skull removed; moving: the same image through a "
        f"known smooth deformation ({args.rms_mm:g} mm RMS in the brain), a ±20 % bias field and 2 % noise. "
        "EPE: distance between the method's displacement and the true one at the brain's voxels; folding and "
        "std log|J| in the brain; time: the whole call (reading and writing files included for ours).", "",
        "| method | EPE mean (mm) | EPE 95th pct (mm) | folding % | std log\\|J\\| | time (s) | device |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['method']} | {r['epe_mean_mm']:.2f} | {r['epe_p95_mm']:.2f} | {r['folding_pct']:.3f} | "
          f"{r['std_logjac']:.3f} | {r['seconds']:.1f} | {r.get('device', '')} |" for r in rows], ""]
    text = "\n".join(lines)
    (args.out / "real_t1_check.md").write_text(text)
    if args.table:
        args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
