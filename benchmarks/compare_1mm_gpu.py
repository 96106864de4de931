"""The 1 mm comparison on one GPU: our stages, FireANTs and ANTs SyN on the same held-out brain pairs.

Three steps, because the GPU machine holds neither ANTs nor SimpleITK and a call carries at most 64 MiB:

1. ``prepare`` (CPU, here): the embedded brains at 1 mm, centre alignment (the shipped model's training setup,
   ``configs/profiles/pretrained_brain.json``): the 6 test volumes of the 3 held-out donors (24 ordered cross-donor
   pairs) written as a ``deepsim compare`` folder: ``data/`` (images as uint8 NIfTI with slope 1/255, so every
   method reads the same [0, 1] values; labels int16) and ``models/`` (the shipped NCC network and 1 mm feature
   nets). ~17 MB.
2. ``run`` (GPU): ``deepsim.evaluation.compare.compare_methods`` on that folder for our methods and FireANTs, on
   ``cuda``; FireANTs reads its arrays through ``benchmarks/sitk_standin.py`` where SimpleITK is missing (checked
   identical). Optionally again with Gaussian noise on both images (``--noise``).
3. ``ants`` (CPU, here): ANTs SyN on the same folder; ``merge``: one table from the result files.

    python benchmarks/compare_1mm_gpu.py prepare --out .gpudata/brain1mm
    python benchmarks/compare_1mm_gpu.py run --run-dir .gpudata/brain1mm --out /tmp/gpu1mm      # on the GPU
    python benchmarks/compare_1mm_gpu.py ants --run-dir .gpudata/brain1mm --out /tmp/ants1mm
    python benchmarks/compare_1mm_gpu.py merge --results /tmp/gpu1mm/results.csv /tmp/ants1mm/results.csv \\
        --table benchmarks/results/compare_brain_mri_1mm_gpu.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUR_METHODS = ["identity", "affine", "affine+ncc", "affine+io", "ncc+io", "ncc+io-deepsim-seg", "ncc+io-mind"]
NOISE_METHODS = ["ncc+io", "ncc+io-deepsim-seg"]


def prepare(out: Path, seed: int = 0) -> None:
    import nibabel as nib

    from deepsim.data.datasets import prepare_embedded_brains
    from deepsim.resources import bundle_dir

    source = out.parent / f".{out.name}-source"
    datalist = prepare_embedded_brains(source, spacing_mm=1.0, augment_copies=0, seed=seed, progress=True)
    content = json.loads(datalist.read_text())
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    for item in content["test"]:
        image = nib.load(source / item["image"])
        values = np.clip(np.round(np.asarray(image.dataobj, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        quantised = nib.Nifti1Image(values, image.affine)
        quantised.header.set_slope_inter(1.0 / 255.0, 0.0)
        nib.save(quantised, out / "data" / item["image"])
        label = nib.load(source / item["label"])
        labels = nib.Nifti1Image(np.asarray(label.dataobj).astype(np.int16), label.affine)
        nib.save(labels, out / "data" / item["label"])
    content.update(training=[], validation=[])
    (out / "data" / "datalist.json").write_text(json.dumps(content, indent=1))
    models = bundle_dir("brain_mri") / "models"
    shutil.copy(models / "pretrained" / "registration_ncc.pt", out / "models" / "registration_ncc.pt")
    for kind in ("ae", "seg"):
        shutil.copy(models / f"feature_{kind}.pt", out / "models" / f"feature_{kind}.pt")
    shutil.rmtree(source)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"{out}: {len(content['test'])} test volumes, {size:.1f} MB")


def run(run_dir: Path, out: Path, methods: list[str], noise: float, device: str, max_pairs: int | None) -> None:
    sys.path.insert(0, str(HERE))
    import torch

    from sitk_standin import install

    from deepsim.evaluation.compare import compare_methods, summarise_comparison

    standin = install()
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    out.mkdir(parents=True, exist_ok=True)
    # one untimed pass over the first pair: CUDA initialisation and cuDNN autotuning stay out of the timings
    compare_methods(run_dir, out / "warmup", methods=methods, device=device, progress=False, hd95=False, max_pairs=1)
    shutil.rmtree(out / "warmup")
    frames = []
    passes = [(0.0, methods)] + ([(noise, [m for m in NOISE_METHODS if m in methods])] if noise > 0 else [])
    for noise_std, names in passes:
        if names:
            started = time.perf_counter()
            results, _ = compare_methods(run_dir, out / f"noise{noise_std:g}", methods=names, device=device,
                                         noise_std=noise_std, progress=False, hd95=False, max_pairs=max_pairs)
            print(f"noise {noise_std:g}: {len(names)} methods in {time.perf_counter() - started:.1f} s", flush=True)
            frames.append(results)
    import pandas as pd

    results = pd.concat(frames, ignore_index=True)
    results.to_csv(out / "results.csv", index=False)
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    (out / "machine.json").write_text(json.dumps({
        "device": machine, "torch": torch.__version__, "python": sys.version.split()[0],
        "fireants_arrays_through": "sitk_standin" if standin else "SimpleITK"}, indent=1))
    for noise_std, frame in results.groupby("noise_std"):
        print(f"noise {noise_std:g}")
        print(summarise_comparison(frame)[["dice_mean", "dice_std", "folding_pct", "std_logjac", "seconds"]]
              .round(4).to_string())


def ants(run_dir: Path, out: Path, max_pairs: int | None) -> None:
    from deepsim.evaluation.compare import compare_methods

    compare_methods(run_dir, out, methods=["ants-syn"], device="cpu", max_pairs=max_pairs, progress=True, hd95=False)


def merge(results: list[Path], table: Path, commands: list[str]) -> None:
    import pandas as pd

    from deepsim.evaluation.compare import comparison_table, summarise_comparison

    frame = pd.concat([pd.read_csv(p) for p in results], ignore_index=True)
    noisy = frame["noise_std"].fillna(0) > 0
    frame.loc[noisy, "method"] = frame.loc[noisy].apply(lambda r: f"{r['method']} (noise σ {r['noise_std']:g})",
                                                          axis=1)
    clean = summarise_comparison(frame[~noisy])
    lines = ["# 1 mm held-out brain pairs: our stages, FireANTs (GPU) and ANTs SyN (CPU)", "",
             "Commands:", "", *[f"    {c}" for c in commands], "", comparison_table(clean), ""]
    if noisy.any():
        lines += ["With Gaussian noise added to both images:", "", comparison_table(summarise_comparison(frame[noisy])),
                  ""]
    table.write_text("\n".join(lines).replace("| nan |", "| — |"))  # HD95 is not computed at 1 mm (hd95=False)
    print(table.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--run-dir", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--methods", nargs="+", default=[*OUR_METHODS, "fireants"])
    r.add_argument("--noise", type=float, default=0.1)
    r.add_argument("--device", default="cuda")
    r.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs (a quick check)")
    a = sub.add_parser("ants")
    a.add_argument("--run-dir", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--max-pairs", type=int, default=None)
    m = sub.add_parser("merge")
    m.add_argument("--results", type=Path, nargs="+", required=True)
    m.add_argument("--table", type=Path, required=True)
    m.add_argument("--command", action="append", default=[])
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out)
    elif args.step == "run":
        run(args.run_dir, args.out, args.methods, args.noise, args.device, args.max_pairs)
    elif args.step == "ants":
        ants(args.run_dir, args.out, args.max_pairs)
    else:
        merge(args.results, args.table, args.command)


if __name__ == "__main__":
    main()
