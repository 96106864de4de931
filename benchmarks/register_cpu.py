"""CPU time to register one 1 mm brain pair with the shipped model, I/O included (issue 7's CPU target).

Two embedded donors in their native 1 mm scanner grids (as ``register_embedded.py`` writes them), registered with
the default model on this machine's CPU:

- **per pair in one process**: ``deepsim register --pairs`` with the same pair ``--repeats`` + 1 times; the first is
  a warm-up (lazy initialisation), the median of the others is reported — reading both images, resampling, the
  network, composing the field on the fixed grid, the Jacobian and writing the four NIfTI outputs and the JSON;
  without and with label maps (Dice, warped labels);
- **one CLI process per pair**: ``deepsim register --fixed … --moving …`` timed from outside, median of
  ``--cli-repeats``, and the bare import time of the package (``python -c "import deepsim.registration.inference"``)
  which every process pays first.

    python benchmarks/register_cpu.py --out /tmp/reg_cpu --table benchmarks/results/register_cpu.md
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from register_embedded import write_native_pair  # noqa: E402


def batch(out: Path, paths: dict, repeats: int, labels: bool) -> list[float]:
    rows = out / ("pairs_labels.csv" if labels else "pairs.csv")
    with open(rows, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fixed", "moving", "fixed_label", "moving_label", "name"])
        for i in range(repeats + 1):
            writer.writerow([paths["fixed"], paths["moving"], paths["fixed_label"] if labels else "",
                             paths["moving_label"] if labels else "", f"r{i}"])
    target = out / ("batch_labels" if labels else "batch")
    subprocess.run([sys.executable, "-m", "deepsim.cli", "register", "--pairs", str(rows), "--out", str(target),
                    "--no-progress"], check=True, capture_output=True, text=True)
    with open(target / "registrations.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_native_pair(args.out / "inputs", "15496", "10021")
    plain = batch(args.out, paths, args.repeats, labels=False)
    with_labels = batch(args.out, paths, args.repeats, labels=True)
    imports = [timed([sys.executable, "-c", "import deepsim.registration.inference"]) for _ in range(args.cli_repeats)]
    cli = [timed([sys.executable, "-m", "deepsim.cli", "register", "--fixed", str(paths["fixed"]), "--moving",
                  str(paths["moving"]), "--out", str(args.out / f"cli{i}"), "--no-progress"])
           for i in range(args.cli_repeats)]
    med = statistics.median
    load = os.getloadavg()
    lines = [
        "# Registering one 1 mm brain pair on the CPU with the shipped model", "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1 / 5 / 15 min).  ",
        "Pair: donor 10021 (moving, 185×180×192 LIP) to donor 15496 (fixed, 182×182×218 LIP), native 1 mm grids; "
        "outputs warped, ddf_mm, jacobian_det (+ warped_label) .nii.gz and registration.json.", "",
        "| case | median s | all runs (s) |", "|---|---|---|",
        f"| in one process (`--pairs`), per pair, images only | {med(plain[1:]):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in plain[1:])} (warm-up {plain[0]:.2f}) |",
        f"| in one process (`--pairs`), per pair, with both label maps (Dice, warped labels) | "
        f"{med(with_labels[1:]):.2f} | {', '.join(f'{t:.2f}' for t in with_labels[1:])} "
        f"(warm-up {with_labels[0]:.2f}) |",
        f"| one `deepsim register` process per pair (start-up and model loading included) | {med(cli):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in cli)} |",
        f"| of which: starting Python and importing deepsim (torch, MONAI) | {med(imports):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in imports)} |",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "register_cpu.md").write_text(text)
    if args.table:
        args.table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
