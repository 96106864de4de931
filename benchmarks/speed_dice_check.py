"""Do the GPU speed-ups change what training learns? Train NCC registration at 1 mm for a fixed number of steps
with each speed setting (same data, seed and steps) and compare the test Dice.

Each setting is a `deepsim run` of a profile written here from ``--base`` (default ``configs/profiles/full.json``)
with only the speed keys changed; one GPU per run, all runs side by side. The first run prepares the data; the
others link to it. One seed-1 run of the plain fp32 setting measures the run-to-run noise at the same settings.

    python benchmarks/speed_dice_check.py --out /tmp/dice_check --gpus 1 2 3 0 --steps 1000

Writes ``dice_check.md`` (Dice, folding, std log|J|, seconds per step per setting) into ``--out``.
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

SETTINGS = {  # name -> (common overrides, seed)
    "fp32, deterministic (before)": ({"precision": "fp32", "channels_last": False, "deterministic": True}, 0),
    "bf16 autocast": ({"precision": "bf16", "channels_last": False, "deterministic": True}, 0),
    "bf16 + channels-last + cuDNN autotuning": ({"precision": "bf16", "channels_last": True,
                                                 "deterministic": False}, 0),
    "fp32, deterministic, seed 1 (noise)": ({"precision": "fp32", "channels_last": False, "deterministic": True}, 1),
}


def write_profile(base: Path, out: Path, name: str, common: dict, steps: int, alignment: str | None) -> Path:
    profile = json.loads(base.read_text())
    profile["common"].update(common)
    if alignment:
        profile["common"]["alignment"] = alignment
    profile["losses"] = ["ncc"]
    profile["experiment"] = "speed_dice_check"
    profile["description"] = f"speed/Dice check: {name}"
    epochs = max(1, steps // 200)
    profile["stages"]["registration"] = {**profile["stages"].get("registration", {}), "max_epochs": epochs,
                                         "epoch_length": steps // epochs}
    path = out / f"profile_{len(list(out.glob('profile_*.json')))}.json"
    path.write_text(json.dumps(profile, indent=1))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=Path("configs/profiles/full.json"))
    parser.add_argument("--gpus", nargs="+", default=["0", "1", "2", "3"],
                        help="one GPU index per setting (or cpu, for a smoke test)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--alignment", default=None, help="override the profile's alignment (e.g. centre)")
    parser.add_argument("--last-after", type=Path, default=None,
                        help="start the last setting only once this file exists (its GPU is busy first)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for i, ((name, (common, seed)), gpu) in enumerate(zip(SETTINGS.items(), args.gpus)):
        run_dir = out / f"run{i}"
        run_dir.mkdir(exist_ok=True)
        if i > 0:  # reuse the data the first run prepares (same profile data keys, so the same dataset)
            while not (out / "run0" / "data" / "datalist.json").exists():
                if procs[0][0].poll() is not None:
                    print(open(procs[0][1]).read()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(5)
            (run_dir / "data").unlink(missing_ok=True)
            (run_dir / "data").symlink_to(out / "run0" / "data")
        if i == len(SETTINGS) - 1 and args.last_after is not None:
            while not args.last_after.exists():
                time.sleep(5)
        profile = write_profile(args.base, out, name, common, args.steps, args.alignment)
        log = out / f"run{i}.log"
        cmd = [sys.executable, "-m", "deepsim.cli", "run", "--profile", str(profile), "--out", str(run_dir),
               "--device", "cpu" if gpu == "cpu" else f"cuda:{gpu}", "--seed", str(seed), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
        procs[i] = (subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), log, name)
        print(f"[dice-check] started {name} on GPU {gpu}", flush=True)
    rows = []
    for i, (proc, log, name) in procs.items():
        rc = proc.wait()
        if rc != 0:
            print(f"[dice-check] {name} failed (exit {rc}):\n{open(log).read()[-3000:]}", file=sys.stderr)
            continue
        results = pd.read_csv(out / f"run{i}" / "report" / "results.csv")
        ncc = results[(results["method"] == "ncc") & (results["noise_std"].fillna(0) == 0)]
        ckpt_meta = _meta(out / f"run{i}" / "models" / "registration_ncc.pt")
        rows.append({"setting": name, "test pairs": len(ncc), "Dice mean": ncc["dice_mean"].mean(),
                     "Dice std": ncc["dice_mean"].std(), "folding %": ncc["folding_pct"].mean(),
                     "std log J": ncc["std_logjac"].mean(), "steps": ckpt_meta.get("iterations"),
                     "s/step (engine)": ckpt_meta.get("train/seconds_per_step")})
    lines = ["# Test Dice after a fixed number of NCC training steps, per speed setting (1 mm)", "",
             f"Command: `python {' '.join(sys.argv)}`", ""]
    if rows:
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
                  for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "dice_check.md").write_text(text)
    print(text)
    return 0 if len(rows) == len(procs) else 1


def _meta(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


if __name__ == "__main__":
    sys.exit(main())
