"""How the instance optimisation's settings trade overlap against smoothness, on held-out pairs of a `deepsim run`.

Each setting registers the same test pairs (every fourth of the 24 by default) through the same affine stage and
network (computed once), then :class:`deepsim.registration.instance.InstanceOptimisation` with one setting
changed from the defaults; rows give mean Dice, folding, std log|J| over the grid and over the fixed brain, and
the median seconds of the optimisation alone.

    deepsim run --out deepsim_output            # the CPU default: its data and NCC network
    python benchmarks/tune_instance_optimisation.py --from deepsim_output \\
        --table benchmarks/results/instance_optimisation_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

#: name -> changes to the defaults (the first row is the defaults themselves)
SETTINGS = {
    "defaults": {},
    "plain Adam steps (step_eps 1e-8)": {"step_eps": 1e-8},
    "field σ 0.5": {"smooth_field": 0.5},
    "field σ 1.0": {"smooth_field": 1.0},
    "gradient σ 2": {"smooth_gradient": 2.0},
    "levels 2, 1": {"scales": (2, 1), "iterations": (50, 20)},
    "levels 4, 2 (no full resolution)": {"scales": (4, 2), "iterations": (50, 30)},
    "svf (scaling and squaring), lr 0.1": {"transform": "svf", "learning_rate": 0.1},
    "NCC window 9": {"window": 9},
    "steps 50, 30, 20": {"iterations": (50, 30, 20)},
    "steps 50, 30, 10": {"iterations": (50, 30, 10)},
    "steps 100, 60, 10": {"iterations": (100, 60, 10)},
    "steps 100, 60, 20": {"iterations": (100, 60, 20)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="run_dir", type=Path, default=Path("deepsim_output"))
    parser.add_argument("--loss", default="ncc")
    parser.add_argument("--every", type=int, default=4, help="use every N-th test pair")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()

    from deepsim.data.pairs import PairDataset
    from deepsim.evaluation.jacobian import jacobian_determinant, std_log_jacobian
    from deepsim.evaluation.summary import pair_metrics
    from deepsim.geometry import Grid, resample_onto
    from deepsim.registration.instance import InstanceOptimisation, instance_similarity
    from deepsim.registration.pipeline import Registration, method_registrar
    from deepsim.losses import LocalNCCLoss
    from deepsim.spatial import warp_labels

    datalist = args.run_dir / "data" / "datalist.json"
    spacing = float(json.loads(datalist.read_text())["spacing_mm"])
    grid_affine = np.diag([spacing] * 3 + [1.0])
    pairs = PairDataset(datalist, "test")
    first_stages = method_registrar("affine+" + args.loss, args.run_dir / "models")  # affine, then the network
    prepared = []  # (pair, fixed, moving through the affine, the network's field, that registration)
    for i in range(0, len(pairs), args.every):
        pair = pairs[i]
        f, m = (torch.as_tensor(np.asarray(pair[k][0], dtype=np.float32)) for k in ("fixed", "moving"))
        registration = first_stages.on_grid(f, m, spacing)
        m_aff = resample_onto(m, grid_affine, Grid(tuple(f.shape), grid_affine), transform=registration.matrix)
        prepared.append((pair, f[None, None], m_aff[None, None], registration.ddf, registration))
    rows = []
    for name in args.settings:
        changes = dict(SETTINGS[name])
        window = changes.pop("window", None)
        similarity = LocalNCCLoss(3, window) if window else instance_similarity(args.loss, 3, args.run_dir / "models")
        optimiser = InstanceOptimisation(similarity, **changes)
        scores = []
        for pair, f, m_aff, init, affine_registration in prepared:
            started = time.perf_counter()
            result = optimiser(m_aff, f, init)
            seconds = time.perf_counter() - started
            total = Registration(affine_registration.matrix, result.ddf, affine_registration.grid).voxel_ddf()
            fixed_label = np.asarray(pair["fixed_label"][0])
            warped = warp_labels(torch.as_tensor(pair["moving_label"])[None], total)[0, 0].numpy()
            metrics, _ = pair_metrics(fixed_label, warped, total)
            det = jacobian_determinant(total)[0]
            metrics["std_logjac_brain"] = std_log_jacobian(det, torch.as_tensor(fixed_label > 0))
            scores.append({**metrics, "seconds": seconds})
        row = {"setting": name, **{k: float(np.mean([s[k] for s in scores])) for k in scores[0] if k != "seconds"},
               "seconds": float(np.median([s["seconds"] for s in scores]))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# Instance optimisation settings: overlap against smoothness", "",
        f"Command: `python benchmarks/tune_instance_optimisation.py --from <deepsim run output> --loss {args.loss} "
        f"--every {args.every}` on {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; {len(prepared)} test pairs of `{args.run_dir.name}` (every {args.every}th), each "
        f"through the same affine stage and the `{args.loss}` network first. One setting changed per row.", "",
        "| setting | Dice | folding % | std log\\|J\\| (grid) | std log\\|J\\| (brain) | seconds (median) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['setting']} | {r['dice_mean']:.4f} | {r['folding_pct']:.4f} | {r['std_logjac']:.3f} | "
          f"{r['std_logjac_brain']:.3f} | {r['seconds']:.2f} |" for r in rows], ""]
    text = "\n".join(lines)
    print(text)
    if args.table:
        args.table.write_text(text)


if __name__ == "__main__":
    main()
