"""Learning curves of the synthetic pretraining chain: one figure, and optionally every curve into MLflow.

Each job folder of ``benchmarks/pretrain_synthetic_gpu.sh`` holds ``<checkpoint>.curve.csv`` (every call of the
chain appended to it). This script plots training loss and held-out Dice against the iteration, one panel per
job, and with ``--tracking-uri`` logs each curve as one MLflow run (experiment ``synthetic-pretraining``):

    python benchmarks/pretrain_curves.py --chain CHAIN_DIR --figure benchmarks/results/learned_curves.png \\
        [--csv benchmarks/results/learned_curves.csv] [--tracking-uri sqlite:///deepsim_output/mlflow.db]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from deepsim.tracking.curve import log_curve, read_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", type=Path, required=True, help="folder of job folders")
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--csv", type=Path, default=None, help="all curves in one CSV (job, iteration, metric, value)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="synthetic-pretraining")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = {path.parent.name: read_curve(path) for path in sorted(args.chain.glob("*/*.curve.csv"))}
    if not jobs:
        raise SystemExit(f"{args.chain}: no */*.curve.csv")
    fig, axes = plt.subplots(1, len(jobs), figsize=(3.2 * len(jobs), 3.0), squeeze=False)
    for ax, (job, rows) in zip(axes[0], jobs.items()):
        for metric, style in (("train/loss", "-"), ("val/dice", "--")):
            points = [(r["iteration"], r["value"]) for r in rows if r["metric"] == metric]
            if points:
                ax.plot(*zip(*points), style, marker=".", label=metric)
        ax.set_title(job, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=90)
    print(args.figure)
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["job", "iteration", "metric", "value"])
            for job, rows in jobs.items():
                writer.writerows([job, r["iteration"], r["metric"], f"{r['value']:.6g}"] for r in rows)
        print(args.csv)
    if args.tracking_uri:
        for path in sorted(args.chain.glob("*/*.curve.csv")):
            run_id = log_curve(path, args.tracking_uri, args.experiment, path.parent.name)
            print(f"{path.parent.name}: MLflow run {run_id}")


if __name__ == "__main__":
    main()
