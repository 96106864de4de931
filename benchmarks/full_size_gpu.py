"""The brain pipeline at full size (1 mm) on several GPUs of one machine: one loss per GPU, side by side.

Each loss is an ordinary `deepsim run --losses <loss>` of one profile (default ``configs/profiles/full.json``) on
its own GPU; the first run prepares the data and the others link to it, so every loss trains and is tested on the
same data. Steps and time limits of the stages can be set here (the profile's are for a longer run). At the end
the test tables are merged into one Markdown report (identity from the first run):

    python benchmarks/full_size_gpu.py --out /tmp/full --gpus 0 1 2 3 --registration-steps 2000 \\
        --table benchmarks/results/gpu_1mm_brain.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", type=Path, default=Path("configs/profiles/full.json"))
    parser.add_argument("--losses", nargs="+", default=["mse", "ncc", "deepsim-ae", "deepsim-seg"])
    parser.add_argument("--gpus", nargs="+", default=["0", "1", "2", "3"], help="one GPU per loss (or cpu)")
    parser.add_argument("--registration-steps", type=int, default=None)
    parser.add_argument("--feature-steps", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per training stage (a cap)")
    parser.add_argument("--alignment", default=None, help="override the profile's alignment (e.g. centre)")
    parser.add_argument("--augment-copies", type=int, default=None, help="override the profile's augment_copies")
    parser.add_argument("--table", type=Path, default=None, help="also write the merged report here")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only prepare the data (the first loss's preprocess stage) and exit; a later call with "
                        "the same arguments reuses it (e.g. prepare on the CPU while the GPUs are busy)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = json.loads(args.profile.read_text())
    if args.alignment:
        profile["common"]["alignment"] = args.alignment
    if args.augment_copies is not None:
        profile["common"]["augment_copies"] = args.augment_copies
    stages = profile.setdefault("stages", {})
    for stage, steps in (("registration", args.registration_steps), ("feature_ae", args.feature_steps),
                         ("feature_seg", args.feature_steps)):
        cfg = stages.setdefault(stage, {})
        if steps:
            epochs = max(1, steps // 200)
            cfg.update(max_epochs=epochs, epoch_length=steps // epochs)
        if args.time_limit:
            cfg["time_limit_s"] = args.time_limit
    profile_path = out / "profile.json"
    profile_path.write_text(json.dumps(profile, indent=1))
    if args.prepare_only:
        from deepsim.workflow import bundle_dir, load_profile, run_stage, stage_common

        loaded = load_profile(str(profile_path))
        run_stage("preprocess", stage_common(loaded, out / args.losses[0], progress=False),
                  bundle_dir(loaded.bundle))
        print(f"[full-size] data prepared in {out / args.losses[0] / 'data'}")
        return 0
    procs = []
    started = time.perf_counter()
    for i, (loss, gpu) in enumerate(zip(args.losses, args.gpus)):
        run_dir = out / loss
        run_dir.mkdir(exist_ok=True)
        if i > 0:
            first = out / args.losses[0] / "data" / "datalist.json"
            while not first.exists():
                if procs[0][0].poll() is not None:
                    print(procs[0][1].read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(5)
            (run_dir / "data").unlink(missing_ok=True)
            (run_dir / "data").symlink_to(first.parent)
        log = out / f"{loss}.log"
        cmd = [sys.executable, "-m", "deepsim.cli", "run", "--profile", str(profile_path), "--losses", loss,
               "--out", str(run_dir), "--device", "cpu" if gpu == "cpu" else f"cuda:{gpu}", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        procs.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), log, loss))
        print(f"[full-size] {loss} on GPU {gpu}", flush=True)
    frames, meta = [], {}
    for i, (proc, log, loss) in enumerate(procs):
        if proc.wait() != 0:
            print(f"[full-size] {loss} failed:\n{log.read_text()[-3000:]}", file=sys.stderr)
            continue
        res = pd.read_csv(out / loss / "report" / "results.csv")
        res = res[res["noise_std"].fillna(0) == 0]
        frames.append(res if i == 0 else res[res["method"] == loss])
        ckpt = torch.load(out / loss / "models" / f"registration_{loss}.pt", map_location="cpu", weights_only=True)
        meta[loss] = ckpt["meta"]
    if not frames:
        return 1
    results = pd.concat(frames)
    results.to_csv(out / "results.csv", index=False)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = [f"# Brain pipeline at 1 mm on GPUs, one loss per GPU ({device})", "",
             f"Command: `python {' '.join(sys.argv)}` (profile {args.profile}, written to profile.json with the "
             f"overrides); wall time {time.perf_counter() - started:.0f} s.", "",
             "| method | test pairs | Dice mean ± std | folding % | std log J | registration steps | s/step | "
             "train time (s) |", "|---|---|---|---|---|---|---|---|"]
    for method, group in results.groupby("method", sort=False):
        m = meta.get(method, {})
        per_pair = group["dice_mean"]
        lines.append(f"| {method} | {len(group)} | {per_pair.mean():.3f} ± {per_pair.std():.3f} | "
                     f"{group['folding_pct'].mean():.3f} | {group['std_logjac'].mean():.3f} | "
                     f"{m.get('iterations', '—')} | {_f(m.get('train/seconds_per_step'))} | "
                     f"{_f(m.get('train_time_s'), '.0f')} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    if args.table:
        args.table.write_text(text)
    print(text)
    return 0 if len(frames) == len(procs) else 1


def _f(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(float(value), spec)


if __name__ == "__main__":
    sys.exit(main())
