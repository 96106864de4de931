"""The learned half on the 24 held-out 1 mm pairs: networks trained on fixed data and on synthetic pairs, alone and
as the start of instance optimisation, beside the affine, ``affine+io``, FireANTs and ANTs SyN (issue 25).

Same pairs and code as ``benchmarks/compare_1mm_gpu.py`` (whose ``prepare`` writes the run folder); the networks
come from two models folders, one per pair source, so each (loss, pairs) network is its own row:

    python benchmarks/compare_1mm_gpu.py prepare --out .gpudata/brain1mm                  # CPU: pairs + shipped nets
    python benchmarks/learned_1mm_gpu.py run --run-dir .gpudata/brain1mm --synthetic-models MODELS \\
        --losses dice ncc --out gpu_learned                                                   # one GPU
    python benchmarks/compare_1mm_gpu.py ants --run-dir .gpudata/brain1mm --out ants1mm   # CPU
    python benchmarks/learned_1mm_gpu.py merge --results gpu_learned/results.csv ants1mm/results.csv \\
        --table benchmarks/results/learned_1mm_gpu.md

Rows: ``identity``, ``affine``, ``affine+io`` (no network), ``fireants``, ``ants-syn``; for the fixed-data network
(the shipped NCC model) and every synthetic-pair network ``<loss>``: ``affine+<loss>`` (our affine, then the network
alone) and ``<loss>+io`` (affine, network, instance optimisation with local NCC for label-trained networks, else
the network's own loss). Synthetic-pair rows are named ``<method> [synthetic]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SYNTHETIC = " [synthetic]"
BASE_METHODS = ["identity", "affine", "affine+io", "affine+ncc", "ncc+io", "fireants"]


def run(run_dir: Path, synthetic_models: Path, losses: list[str], out: Path, device: str, max_pairs: int | None,
        io_loss: str | None, base_methods: list[str]) -> None:
    import pandas as pd
    import torch

    from sitk_standin import install

    from deepsim.evaluation.compare import compare_methods, summarise_comparison

    install()
    torch.backends.cudnn.benchmark = device.startswith("cuda")
    out.mkdir(parents=True, exist_ok=True)
    # the synthetic networks' run folder: the same data, their own models (and the shipped feature nets)
    synthetic_run = out / "synthetic_run"
    (synthetic_run / "models").mkdir(parents=True, exist_ok=True)
    if not (synthetic_run / "data").exists():
        (synthetic_run / "data").symlink_to((run_dir / "data").resolve(), target_is_directory=True)
    for path in synthetic_models.glob("*.pt"):
        if not path.name.endswith(".state.pt"):
            shutil.copy(path, synthetic_run / "models" / path.name)
    for kind in ("ae", "seg"):
        if not (synthetic_run / "models" / f"feature_{kind}.pt").exists():
            shutil.copy(run_dir / "models" / f"feature_{kind}.pt", synthetic_run / "models" / f"feature_{kind}.pt")
    suffix = f"+io-{io_loss}" if io_loss else "+io"
    synthetic_methods = [m for loss in losses for m in (f"affine+{loss}", f"{loss}{suffix}")]
    # one untimed pass: CUDA start-up and cuDNN autotuning stay out of the timings
    compare_methods(run_dir, out / "warmup", methods=["affine+io"], device=device, progress=False, hd95=False,
                    max_pairs=1)
    shutil.rmtree(out / "warmup")
    frames = []
    # the new networks first: a call stopped by its time limit keeps each finished pass's results_<n>.csv
    for folder, methods, label in ((synthetic_run, synthetic_methods, SYNTHETIC), (run_dir, base_methods, "")):
        started = time.perf_counter()
        results, _ = compare_methods(folder, out / f"pass{len(frames)}", methods=methods, device=device,
                                     progress=False, hd95=False, max_pairs=max_pairs)
        results["method"] = results["method"] + label
        results.to_csv(out / f"results_{len(frames)}.csv", index=False)
        print(f"{len(methods)} methods in {time.perf_counter() - started:.1f} s", flush=True)
        frames.append(results)
    results = pd.concat(frames, ignore_index=True)
    results.to_csv(out / "results.csv", index=False)
    print(summarise_comparison(results)[["dice_mean", "dice_std", "folding_pct", "std_logjac", "seconds"]]
          .round(4).to_string())


def merge(results: list[Path], table: Path, commands: list[str]) -> None:
    from compare_1mm_gpu import merge as merge_tables

    merge_tables(results, table, commands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--run-dir", type=Path, required=True)
    r.add_argument("--synthetic-models", type=Path, required=True)
    r.add_argument("--losses", nargs="+", default=["dice"])
    r.add_argument("--io-loss", default=None, help="instance optimisation loss of the synthetic rows (default: "
                                                   "local NCC for label-trained networks, else their own)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--max-pairs", type=int, default=None)
    r.add_argument("--base-methods", nargs="+", default=BASE_METHODS, help="rows without a synthetic-pair network")
    m = sub.add_parser("merge")
    m.add_argument("--results", type=Path, nargs="+", required=True)
    m.add_argument("--table", type=Path, required=True)
    m.add_argument("--command", dest="commands", action="append", default=[])
    args = parser.parse_args()
    if args.command == "run":
        run(args.run_dir, args.synthetic_models, args.losses, args.out, args.device, args.max_pairs, args.io_loss,
            args.base_methods)
    else:
        merge(args.results, args.table, args.commands)


if __name__ == "__main__":
    main()
