"""Same seed, same machine, same table? Run the main job twice and compare everything it computes.

    python benchmarks/determinism_main_job.py --profile quick                 # ~1.5 min on 2 CPU cores
    python benchmarks/determinism_main_job.py --profile default --device cpu  # ~25 min on 2 CPU cores
    python benchmarks/determinism_main_job.py --profile quick --threads 1 2   # across thread counts (differs)

Each run is ``deepsim run --profile P --seed S --out <work>/run<i> --no-progress`` in its own process (a fresh
Python, as a user would start it). Compared, run 1 against each later run:

- ``report/results.csv``: every cell of every column except the wall-clock measurements ``inference_s`` and
  ``train_time_s`` (timings are measured, not computed: they differ on every run of any program), as text, exactly;
- every network in ``models/`` (``registration_*.pt``, ``feature_*.pt``): every tensor, bit for bit;
- the prepared data (``data/*.nii.gz``): every voxel.

Prints one line per comparison and a verdict; exit status 0 when everything is identical, 1 otherwise. With
``--threads N M`` each run pins torch's intra-op threads (``OMP_NUM_THREADS``) to one of the values, which shows what
changes between machines with other core counts (docs/reliability.md, "Determinism").
``--write`` appends the result to ``benchmarks/results/determinism_main_job.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING_COLUMNS = ("inference_s", "train_time_s")
RESULTS = Path(__file__).resolve().parent / "results" / "determinism_main_job.md"


def run_job(out: Path, profile: str, seed: int, device: str | None, threads: int | None) -> float:
    command = ["deepsim", "run", "--profile", profile, "--seed", str(seed), "--out", str(out), "--no-progress"]
    if device:
        command += ["--device", device]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def compare_results(a: Path, b: Path) -> tuple[bool, str]:
    rows_a, rows_b = (list(csv.DictReader(open(p / "report" / "results.csv"))) for p in (a, b))
    if len(rows_a) != len(rows_b) or (rows_a and rows_a[0].keys() != rows_b[0].keys()):
        return False, f"results.csv: {len(rows_a)} vs {len(rows_b)} rows or other columns"
    columns = [c for c in (rows_a[0].keys() if rows_a else []) if c not in TIMING_COLUMNS]
    differ = [(i, c, x[c], y[c]) for i, (x, y) in enumerate(zip(rows_a, rows_b)) for c in columns if x[c] != y[c]]
    if differ:
        i, c, x, y = differ[0]
        return False, f"results.csv: {len(differ)} cells differ (first: row {i + 1} {c}: {x} vs {y})"
    return True, (f"results.csv: {len(rows_a)} rows x {len(columns)} columns identical "
                  f"(timings {TIMING_COLUMNS} excluded)")


def compare_models(a: Path, b: Path) -> tuple[bool, str]:
    import torch

    names = sorted(p.name for p in (a / "models").glob("*.pt") if not p.name.endswith(".state.pt"))
    worst, differ = 0.0, []
    for name in names:
        x = torch.load(a / "models" / name, weights_only=True)["state_dict"]
        y = torch.load(b / "models" / name, weights_only=True)["state_dict"]
        for key in x:
            if not torch.equal(x[key], y[key]):
                differ.append(f"{name}:{key}")
                worst = max(worst, float((x[key].double() - y[key].double()).abs().max()))
    if differ:
        return False, f"models: {len(differ)} tensors differ (first {differ[0]}; largest difference {worst:.3g})"
    return True, f"models: {len(names)} networks bit-identical ({', '.join(names)})"


def compare_data(a: Path, b: Path) -> tuple[bool, str]:
    import nibabel as nib
    import numpy as np

    files = sorted(p.name for p in (a / "data").glob("*.nii.gz"))
    differ = [f for f in files if not np.array_equal(np.asarray(nib.load(a / "data" / f).dataobj),
                                                     np.asarray(nib.load(b / "data" / f).dataobj))]
    if differ:
        return False, f"data: {len(differ)} of {len(files)} prepared volumes differ (first {differ[0]})"
    return True, f"data: {len(files)} prepared volumes identical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default=None, help="passed to deepsim run (default: its own choice)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="OMP_NUM_THREADS of each run, cycled (default: torch's own choice for every run)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--write", action="store_true", help=f"append the result to {RESULTS}")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="deepsim-determinism-"))
    runs, lines = [], []
    for i in range(args.runs):
        threads = args.threads[i % len(args.threads)] if args.threads else None
        out = work / f"run{i + 1}"
        seconds = run_job(out, args.profile, args.seed, args.device, threads)
        runs.append(out)
        lines.append(f"run {i + 1}: {out} ({seconds:.0f} s{f', OMP_NUM_THREADS={threads}' if threads else ''})")
        print(lines[-1], flush=True)
    identical = True
    for other in runs[1:]:
        for compare in (compare_data, compare_models, compare_results):
            same, line = compare(runs[0], other)
            identical &= same
            lines.append(f"run 1 vs {other.name}: {'SAME' if same else 'DIFFERENT'}: {line}")
            print(lines[-1], flush=True)
    verdict = "identical" if identical else "NOT identical"
    print(f"verdict: {args.runs} runs of profile {args.profile!r}, seed {args.seed}: {verdict}")
    if args.write:
        import torch

        command = "python benchmarks/determinism_main_job.py " + " ".join(sys.argv[1:])
        header = (f"\n## {time.strftime('%Y-%m-%d')}: profile `{args.profile}`, seed {args.seed} — {verdict}\n\n"
                  f"`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                  f"Python {platform.python_version()}\n\n")
        if not RESULTS.exists():
            RESULTS.write_text("# Determinism of the main job: the same seed twice on one machine\n\n"
                               "Written by `benchmarks/determinism_main_job.py --write` (docs/reliability.md).\n")
        with open(RESULTS, "a") as f:
            f.write(header + "\n".join(f"- {line}" for line in lines) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
