"""Training and inference speed of registration at 1 mm brain size (160×192×224), one device, one run.

Measures, side by side in one process on one device:

- the **reference**: a plain fp32 eager PyTorch loop with MONAI's ``VoxelMorph`` (its default ``VoxelMorphUNet``,
  no integration), MONAI's local NCC (window 9) and diffusion loss, Adam;
- **ours**, through the real engine (``build_trainer`` + ``RegistrationTask``, as the bundles train): the
  registration U-Net of the 1 mm profile, first as it was (fp32, eager, MONAI's NCC), then adding one speed-up
  at a time (our separable-pool NCC, bf16 autocast, channels-last weights, cuDNN autotuning, ``torch.compile``),
  then every loss (MSE, NCC, DeepSim-AE, DeepSim-seg) with the chosen settings at batch 1 and at the largest
  batch that fits.

Per case: training steps/s (median over ``--repeats`` blocks of ``--steps`` steps after ``--warmup``), inference
ms per pair (network + warp of the moving image, no grad; median of ``--inference-runs``), peak GPU memory of
training, and the ratio to the reference. Writes ``speed.json``, ``speed.md`` and a profiler table of the final NCC
step (``profile_ncc.txt``) into ``--out``:

    python benchmarks/speed.py --out /tmp/speed                       # GPU, full size (minutes)
    python benchmarks/speed.py --out /tmp/speed --device cpu --size 32 32 32 --steps 2 --warmup 1  # smoke test

Inputs are smooth random volumes made on the device (the cost of every operation is independent of content); the
DeepSim feature nets are randomly initialised nets of the bundle's architecture (timing only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from ignite.engine import Events
from torch.nn import functional as F

from deepsim.engine.tasks import RegistrationTask
from deepsim.engine.trainer import autocast, build_trainer, speed_up
from deepsim.features.networks import build_feature_net
from deepsim.registration.network import RegistrationNet
from deepsim.registration.objective import RegistrationObjective
from deepsim.losses import LocalNCCLoss, build_similarity
from deepsim.spatial import warp_image


@dataclass
class Case:
    name: str
    loss: str = "ncc"
    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False
    monai_ncc: bool = False
    batch: int = 1
    reference: bool = False
    result: dict = field(default_factory=dict)


class MonaiNCC(torch.nn.Module):
    """The previous path: MONAI's LocalNormalizedCrossCorrelationLoss, shifted to [0, 1]."""

    def __init__(self, window: int = 9):
        super().__init__()
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window)

    def forward(self, warped, fixed):
        return 1.0 + self.lncc(warped, fixed)


def smooth_volumes(n: int, size: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(n, 1, *size, generator=gen, device=device)
    for _ in range(3):
        x = F.avg_pool3d(x, 5, stride=1, padding=2)
    return (x - x.amin()) / (x.amax() - x.amin())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def similarity(case: Case, device: torch.device, feature_nets: dict) -> torch.nn.Module:
    if case.loss == "ncc":
        return MonaiNCC() if case.monai_ncc else LocalNCCLoss(3, 9)
    kind = {"deepsim-ae": "ae", "deepsim-seg": "seg"}.get(case.loss)
    return build_similarity(case.loss, 3, feature_net=feature_nets.get(kind)).to(device)


def our_network(case: Case, device: torch.device) -> torch.nn.Module:
    net = RegistrationNet(3, 1, channels=(16, 32, 32, 32), diffeomorphic=False, half_res=False).to(device)
    return speed_up(net, channels_last=case.channels_last, compile=case.compile)


def time_steps(run_steps, warmup: int, steps: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per step of each of ``repeats`` blocks of ``steps`` steps, after ``warmup`` steps."""
    run_steps(warmup)
    sync(device)
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_steps(steps)
        sync(device)
        blocks.append((time.perf_counter() - start) / steps)
    return blocks


def train_ours(case: Case, size, device, args, feature_nets) -> dict:
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    torch.backends.cudnn.deterministic = not case.cudnn_benchmark
    net = our_network(case, device)
    task = RegistrationTask(RegistrationObjective(similarity(case, device, feature_nets), 1.0))
    fixed, moving = smooth_volumes(case.batch, size, device, 1), smooth_volumes(case.batch, size, device, 2)
    batch = {"fixed": fixed, "moving": moving}
    total = args.warmup + args.repeats * args.steps
    trainer = build_trainer(net, task, [batch] * total, max_epochs=1, device=device, precision=case.precision)
    marks: list[float] = []

    def mark(engine):
        sync(device)
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    blocks = [(marks[args.warmup + (r + 1) * args.steps - 1] - marks[args.warmup + r * args.steps - 1]) / args.steps
              for r in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s_per_step": statistics.median(blocks), "blocks": blocks, "peak_gib": peak, "network": net,
            "task": task}


def train_reference(case: Case, size, device, args) -> dict:
    from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
    from monai.networks.nets import VoxelMorph

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    net = VoxelMorph(integration_steps=0).to(device)
    lncc, diffusion = LocalNormalizedCrossCorrelationLoss(3, kernel_size=9), DiffusionLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    fixed, moving = smooth_volumes(case.batch, size, device, 1), smooth_volumes(case.batch, size, device, 2)

    def run_steps(n):
        for _ in range(n):
            warped, ddf = net(moving, fixed)
            loss = lncc(warped, fixed) + diffusion(ddf)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks = time_steps(run_steps, args.warmup, args.steps, args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s_per_step": statistics.median(blocks), "blocks": blocks, "peak_gib": peak, "network": net}


@torch.no_grad()
def inference_ms(net, case: Case, size, device, runs: int) -> float:
    net.eval()
    fixed, moving = smooth_volumes(1, size, device, 3), smooth_volumes(1, size, device, 4)

    def once():
        with autocast(device, case.precision):
            if case.reference:
                warped, _ = net(moving, fixed)
            else:
                warped = warp_image(moving, net(moving, fixed))
        return warped

    for _ in range(3):
        once()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        once()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    net.train()
    return statistics.median(times)


def run_case(case: Case, size, device, args, feature_nets) -> None:
    torch.manual_seed(0)
    try:
        out = train_reference(case, size, device, args) if case.reference else \
            train_ours(case, size, device, args, feature_nets)
    except torch.OutOfMemoryError:
        case.result = {"oom": True}
        return
    case.result = {"s_per_step": out["s_per_step"], "steps_per_s": 1 / out["s_per_step"],
                   "samples_per_s": case.batch / out["s_per_step"], "peak_gib": out["peak_gib"],
                   "blocks_s": out["blocks"]}
    if case.batch == 1:
        case.result["inference_ms"] = inference_ms(out["network"], case, size, device, args.inference_runs)
    del out
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(base: Case, size, device, args, feature_nets, limit: int) -> Case | None:
    """The largest power-of-two batch (up to ``limit``) whose training step fits in memory, measured."""
    best = None
    batch = 2
    short = argparse.Namespace(**{**vars(args), "warmup": 3, "steps": max(2, args.steps // 4), "repeats": 2})
    while batch <= limit:
        case = Case(**{**asdict(base), "name": f"{base.name}, batch {batch}", "batch": batch, "result": {}})
        run_case(case, size, device, short, feature_nets)
        if case.result.get("oom"):
            break
        best = case
        batch *= 2
    return best


def profile_step(case: Case, size, device, args, feature_nets, path: Path) -> None:
    """torch.profiler table (top kernels by device time) of a few training steps of ``case``."""
    from torch.profiler import ProfilerActivity, profile

    args_short = argparse.Namespace(**{**vars(args), "warmup": 3, "steps": 3, "repeats": 1})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_ours(case, size, device, args_short, feature_nets)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def fmt(value, spec=".2f") -> str:
    return "—" if value is None or value != value else format(value, spec)


def markdown(cases: list[Case], meta: dict, targets: dict) -> str:
    ref = next(c for c in cases if c.reference and c.batch == 1).result
    lines = [f"# Registration speed at {'×'.join(map(str, meta['size']))} ({meta['device_name']})", "",
             f"Command: `{meta['command']}`  ", f"Device: {meta['device_name']}; torch {meta['torch']}, CUDA "
             f"{meta['cuda']}, cuDNN {meta['cudnn']}, MONAI {meta['monai']}, Python {meta['python']}.  ",
             f"Timing: median of {meta['repeats']} blocks of {meta['steps']} training steps after {meta['warmup']} "
             f"warm-up steps; inference = network + warp, no grad, median of {meta['inference_runs']} runs. "
             "Ratios are against the reference in the same run.", "",
             "| case | loss | batch | precision | train steps/s | samples/s | ms/step | × reference speed | "
             "inference ms/pair | peak train memory (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        r = c.result
        if r.get("oom"):
            lines.append(f"| {c.name} | {c.loss} | {c.batch} | {c.precision} | out of memory | | | | | |")
            continue
        speed = ref["s_per_step"] / r["s_per_step"] * c.batch if ref else float("nan")
        lines.append(f"| {c.name} | {c.loss} | {c.batch} | {c.precision} | {fmt(r['steps_per_s'])} | "
                     f"{fmt(r['samples_per_s'])} | {fmt(1000 * r['s_per_step'], '.1f')} | {fmt(speed)} | "
                     f"{fmt(r.get('inference_ms'), '.1f')} | {fmt(r['peak_gib'])} |")
    lines += ["", "\"× reference speed\" compares samples per second. Rows with batch > 1 come from the search for "
              "the largest batch that fits (powers of two up to --max-batch) and are timed shorter: median of 2 "
              "blocks of steps/4 steps after 3 warm-up steps.", "", "## Targets", ""]
    lines += [f"- {k}: {v}" for k, v in targets.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for speed.json, speed.md, profile_ncc.txt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (the median is reported)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--inference-runs", type=int, default=30)
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch tried")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--final", default="bf16,channels_last,cudnn_benchmark",
                        help="speed-ups of the per-loss cases (comma list of: bf16, channels_last, "
                        "cudnn_benchmark, compile)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = tuple(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    feature_nets = {kind: build_feature_net(kind, 3, 1, num_classes=84 if kind == "seg" else None,
                                            channels=(16, 32, 64)).to(device) for kind in ("ae", "seg")}
    final = {s.strip() for s in args.final.split(",") if s.strip()}
    chosen = dict(precision="bf16" if "bf16" in final else "fp32", channels_last="channels_last" in final,
                  cudnn_benchmark="cudnn_benchmark" in final, compile="compile" in final)
    cases = [
        Case("reference: MONAI VoxelMorph, fp32 eager", reference=True),
        Case("ours as before: fp32, MONAI NCC", monai_ncc=True),
        Case("+ separable-pool NCC"),
        Case("+ bf16 autocast", precision="bf16"),
        Case("+ channels-last", precision="bf16", channels_last=True),
        Case("+ cuDNN autotuning", precision="bf16", channels_last=True, cudnn_benchmark=True),
    ]
    if not args.no_compile:
        cases.append(Case("+ torch.compile", precision="bf16", channels_last=True, cudnn_benchmark=True,
                          compile=True))
    for loss in ("mse", "ncc", "deepsim-ae", "deepsim-seg"):
        cases.append(Case(f"ours, {loss}", loss=loss, **chosen))
    for case in cases:
        print(f"[speed] {case.name} ({case.loss}, batch {case.batch})", flush=True)
        run_case(case, size, device, args, feature_nets)
        print(f"[speed]   {json.dumps({k: v for k, v in case.result.items() if k != 'blocks_s'})}", flush=True)
    extra = []
    for base in [cases[0]] + [c for c in cases if c.name.startswith("ours, ")]:
        print(f"[speed] largest batch: {base.name}", flush=True)
        best = largest_batch(base, size, device, args, feature_nets, args.max_batch)
        if best is not None:
            extra.append(best)
            print(f"[speed]   {best.name}: {json.dumps({k: v for k, v in best.result.items() if k != 'blocks_s'})}",
                  flush=True)
    cases += extra
    profile_step(Case("profile", **chosen), size, device, args, feature_nets, args.out / "profile_ncc.txt")

    by_name = {c.name: c.result for c in cases}
    ncc, ref = by_name.get("ours, ncc", {}), by_name[cases[0].name]
    ds = [by_name.get(f"ours, {k}", {}) for k in ("deepsim-ae", "deepsim-seg")]
    targets = {}
    if ncc and not ncc.get("oom"):
        targets["inference ≤ 15 ms per pair (NCC model)"] = f"{ncc['inference_ms']:.1f} ms " + \
            ("(met)" if ncc["inference_ms"] <= 15 else "(not met)")
        targets["training ≥ 12 steps/s with NCC, batch 1"] = f"{ncc['steps_per_s']:.2f} steps/s " + \
            ("(met)" if ncc["steps_per_s"] >= 12 else "(not met)")
        for name, r in zip(("DeepSim-AE", "DeepSim-seg"), ds):
            if r and not r.get("oom"):
                ratio = r["s_per_step"] / ncc["s_per_step"]
                verdict = "(met)" if ratio <= 1.3 else "(not met)"
                targets[f"{name} step ≤ 1.3 × NCC step"] = f"{ratio:.2f} × {verdict}"
        targets["reference (MONAI VoxelMorph fp32)"] = f"{ref['steps_per_s']:.2f} steps/s, " \
            f"{ref['inference_ms']:.1f} ms/pair inference"
    import monai

    meta = {"size": list(size), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "monai": monai.__version__, "python": platform.python_version(),
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
            "inference_runs": args.inference_runs, "command": "python " + " ".join(sys.argv)}
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "targets": targets,
                                                     "cases": [asdict(c) for c in cases]}, indent=1))
    text = markdown(cases, meta, targets)
    (args.out / "speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
