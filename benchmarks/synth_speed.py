"""Speed of the label-driven pair generator (deepsim.data.synth) on one device, and the size of its deformations.

Per case (the default generator, then one option changed at a time) and batch size: pairs per second (median over
``--repeats`` blocks of ``--steps`` calls after ``--warmup``, the device synchronised around each block), the time
of each stage of one call (label maps + deformation, label warp, image synthesis) and, on CUDA, the peak memory.
Then the warps the default draws over ``--field-pairs`` images: folding (% of voxels with det J ≤ 0,
:mod:`deepsim.evaluation.jacobian`), std log|J| and mean/max displacement in the brain, at the default strength,
2× (velocity only), and with the default affine. Writes ``synth_speed.json`` and ``synth_speed.md`` into ``--out``::

    python benchmarks/synth_speed.py --bank bank_1mm.npz --out /tmp/synth_speed            # GPU, 1 mm (≈ 1 min)
    python benchmarks/synth_speed.py --size 48 56 48 --device cpu --batch 1 --steps 2 --out /tmp/s  # smoke test

Without ``--bank`` the maps are random shapes maps of 86 classes made once on the device (the cost of every
operation does not depend on the maps' content).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepsim.data.label_bank import LabelBank
from deepsim.data.synth import LabelPairSynth
from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian

CASES: dict[str, dict] = {
    "default": {},
    "shapes only": {"shapes_probability": 1.0},
    "shapes 10 %": {"shapes_probability": 0.1},
    "labels linear (one-hot argmax)": {"label_interpolation": "linear"},
    "integration at full resolution": {"integration_shrink": 1},
    "thick slices always": {"thick_slice_probability": 1.0},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bank(args: argparse.Namespace, device: torch.device) -> LabelBank:
    if args.bank:
        return LabelBank.load(args.bank, device)
    shapes = LabelPairSynth(None, shape=args.size, num_classes=86, shapes_classes=86, device=device)
    maps = shapes(2, torch.Generator(device=device).manual_seed(0))
    stack = torch.cat([maps["moving_label"][:, 0], maps["fixed_label"][:, 0]]).to(torch.uint8)
    return LabelBank(stack, np.eye(4), tuple(range(86)), tuple(map(str, range(86))), ("s0", "s1", "s2", "s3"))


def _time_case(bank: LabelBank, options: dict, batch: int, args: argparse.Namespace) -> dict:
    device = bank.device
    synth = LabelPairSynth(bank, **options)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.warmup):
        synth(batch, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            synth(batch, generator)
        _sync(device)
        blocks.append(args.steps * batch / (time.perf_counter() - start))
    stages = _stages(synth, batch, generator)
    row = {"pairs_per_s": statistics.median(blocks), "ms_per_call": 1000 * batch / statistics.median(blocks),
           **stages}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _stages(synth: LabelPairSynth, batch: int, generator: torch.Generator) -> dict:
    """Milliseconds of each stage of one call (median of 3)."""
    device, times = synth.device, {"sample_ms": [], "maps_ms": [], "deform_ms": [], "warp_labels_ms": [],
                                   "synthesize_ms": []}
    for _ in range(3):
        marks = [time.perf_counter()]

        def mark() -> None:
            _sync(device)
            marks.append(time.perf_counter())

        params = synth.sample(batch, generator)
        mark()
        base = synth._base_maps(params)
        mark()
        positions = synth.positions(params.velocity.flatten(0, 1), params.affine.flatten(0, 1))
        mark()
        labels = synth._warp_labels(base, positions)
        mark()
        synth.synthesize(labels, params)
        mark()
        for key, a, b in zip(times, marks, marks[1:]):
            times[key].append(1000 * (b - a))
    return {k: statistics.median(v) for k, v in times.items()}


def _fields(bank: LabelBank, args: argparse.Namespace) -> list[dict]:
    """Folding, std log|J| and |u| inside the brain (classes > 0 of the bank's first map) of the drawn warps."""
    brain = bank.maps[0] > 0
    rows = []
    for factor, with_affine in ((1.0, False), (2.0, False), (1.0, True)):
        synth = LabelPairSynth(bank)
        generator = torch.Generator(device=bank.device).manual_seed(1)
        folding, std_log_j, mean, top = [], [], [], []
        for _ in range(args.field_pairs):
            params = synth.sample(1, generator)
            identity = torch.zeros_like(params.affine)
            identity[..., :, : bank.maps.ndim - 1] = torch.eye(bank.maps.ndim - 1, device=bank.device)
            params = dataclasses.replace(params, velocity=params.velocity * factor,
                                         affine=params.affine if with_affine else identity)
            u = synth.displacement(params).flatten(0, 1)
            det = jacobian_determinant(u)
            folding.append(folding_percent(det))
            std_log_j.append(std_log_jacobian(det, brain.expand_as(det)))
            norm = u.norm(dim=1)[:, brain]
            mean.append(float(norm.mean()))
            top.append(float(norm.max()))
        rows.append({"velocity_std_max": synth.options.velocity_std * factor, "affine": with_affine,
                     "folding_percent_max": float(np.max(folding)), "std_log_j_mean": float(np.mean(std_log_j)),
                     "displacement_mean_vox": float(np.mean(mean)), "displacement_max_vox": float(np.max(top))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, default=None, help="label bank .npz (default: random shapes maps)")
    parser.add_argument("--size", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--field-pairs", type=int, default=8)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    bank = _bank(args, device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "shape": list(bank.shape),
               "bank": str(args.bank) if args.bank else "random shapes", "maps": len(bank), "classes": bank.num_classes,
               "cases": [], "fields": []}
    for name in args.cases:
        for batch in args.batch:
            row = {"case": name, "batch": batch, **_time_case(bank, CASES[name], batch, args)}
            results["cases"].append(row)
            print(json.dumps(row))
    results["fields"] = _fields(bank, args)
    for row in results["fields"]:
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth_speed.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Pair generator speed: {results['device']}, torch {results['torch']}, grid {results['shape']}, "
             f"{results['maps']} maps of {results['classes']} classes ({results['bank']})", "",
             "| case | batch | pairs/s | ms/call | sample | maps | deform | warp labels | synthesize | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["cases"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['pairs_per_s']:.1f} | {r['ms_per_call']:.1f} | "
                     f"{r['sample_ms']:.1f} | {r['maps_ms']:.1f} | {r['deform_ms']:.1f} | {r['warp_labels_ms']:.1f} | "
                     f"{r['synthesize_ms']:.1f} | {r.get('peak_memory_gib', float('nan')):.2f} |")
    lines += ["", "Warps of the default generator over the brain (classes > 0 of the first map), voxels of the bank grid:", "",
              "| velocity std max (vox) | affine | folding % (max) | std log det J | mean ‖u‖ (vox) | max ‖u‖ (vox) |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in results["fields"]:
        lines.append(f"| {r['velocity_std_max']:.1f} | {'yes' if r['affine'] else 'no'} | "
                     f"{r['folding_percent_max']:.4f} | {r['std_log_j_mean']:.3f} | {r['displacement_mean_vox']:.2f} | "
                     f"{r['displacement_max_vox']:.2f} |")
    (args.out / "synth_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
