"""Data-parallel scaling of registration training: steps/s on N GPUs (or CPU processes) under torchrun.

    torchrun --standalone --nproc_per_node=4 benchmarks/ddp_scaling.py --out benchmarks/results/ddp_scaling
    bash benchmarks/ddp_scaling.sh                      # N = 1, 2, 4, 8 (as many GPUs as the host has)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/ddp_scaling.py --size 32 32 32 \\
        --steps 3 --warmup 1 --out /tmp/ddp_cpu       # CPU + gloo check

Runs the stages' own training path — ``build_trainer`` + ``RegistrationTask`` on a network wrapped by
``wrap_ddp`` and a loader over ``PassShuffledSampler`` — for each loss (default NCC and DeepSim-seg, the latter with
a randomly initialised feature net of the bundle's architecture: timing does not depend on its weights) on
synthetic in-memory volumes (``--size``, default 160×192×224, the 1 mm brain grid), batch 1 per process.
After ``--warmup`` steps it times ``--steps`` steps (CUDA synchronised, slowest rank), then profiles
``--profile-steps`` more steps with ``torch.profiler`` to measure the time of the all-reduce kernels (NCCL kernels
on GPUs; gloo operations on CPUs). The all-reduce runs while backward still computes (DDP buckets), so its time
is not all exposed in the step time.

Rank 0 writes ``<out>/n<N>.json`` and rewrites ``<out>/ddp_scaling.md`` from every ``n*.json`` there: steps/s,
samples/s, per-GPU efficiency (samples/s at N over N × samples/s at N = 1 of the same device, size, precision and
loss), peak memory per process and all-reduce time per step. N = 1 runs the plain single-process trainer (no DDP
wrapper), the baseline users have today.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from torch.utils.data import DataLoader, Dataset

from deepsim.engine import distributed
from deepsim.engine.checkpoints import build_network
from deepsim.engine.tasks import RegistrationTask
from deepsim.engine.trainer import build_trainer, seed_everything, speed_up
from deepsim.features.networks import build_feature_net
from deepsim.registration.objective import RegistrationObjective
from deepsim.losses import FEATURE_NET_OF, build_similarity
from deepsim.workflow import bundle_dir, load_profile

# Desikan-Killiany: 83 labelled regions + background in the embedded brains (only the seg head's size depends on it)
NUM_SEG_CLASSES = 84


def architecture(profile_name: str) -> dict:
    """Network sizes and λ of the brain bundle under ``profile_name`` (bundle defaults, profile overrides)."""
    configs = bundle_dir("brain_mri") / "configs"
    common = json.loads((configs / "common.json").read_text())
    lambdas = json.loads((configs / "train_registration.json").read_text())["lambdas"]
    profile = load_profile(profile_name)
    common.update(profile.common)
    lambdas.update(profile.lambdas)
    return {"profile": profile.name, "registration_channels": list(common["registration_channels"]),
            "registration_half_res": bool(common["registration_half_res"]),
            "feature_channels": list(common["feature_channels"]), "lambdas": lambdas}


class SyntheticPairs(Dataset):
    """``length`` (fixed, moving) pairs cycling over 4 random volumes (1, *size), held like the stages' PairDataset
    holds its images: on a GPU ``device`` as plain tensors (no host copy per step), else as MetaTensors."""

    def __init__(self, size: list[int], length: int, device: torch.device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        volumes = [torch.rand(1, *size, generator=generator) for _ in range(4)]
        if device.type == "cpu":
            self.volumes = [MetaTensor(v, affine=torch.eye(4)) for v in volumes]
        else:
            self.volumes = [v.to(device) for v in volumes]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"fixed": self.volumes[index % 4].clone(), "moving": self.volumes[(index + 1) % 4].clone()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall time of iterations ``warmup + 1 .. warmup + steps`` on this rank; then profiles the remaining ones."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.elapsed_s = float("nan")
        self.peak_bytes = 0
        self.profiler = None
        self._start = 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._tick)
        if self.warmup == 0:
            engine.add_event_handler(Events.STARTED, self._tick)
        engine.add_event_handler(Events.COMPLETED, self._stop_profiler)

    def _tick(self, engine) -> None:
        it = engine.state.iteration
        if it == self.warmup:
            _sync(self.device)
            distributed.barrier()
            self._start = time.perf_counter()
        if it == self.warmup + self.steps:
            _sync(self.device)
            self.elapsed_s = time.perf_counter() - self._start
            if self.device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def _stop_profiler(self, engine) -> None:
        if self.profiler is not None:
            _sync(self.device)
            self.profiler.stop()


def allreduce_ms(profiler, device: torch.device) -> float:
    """Summed time (ms) of the all-reduce work the profiler saw: NCCL kernels on CUDA, gloo operations on CPU."""
    total_us = 0.0
    for event in profiler.key_averages():
        name = event.key.lower()
        if device.type == "cuda":
            if "nccl" in name and event.device_type == torch.autograd.DeviceType.CUDA:
                total_us += getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
        elif "gloo" in name and "all_reduce" in name:
            total_us += event.cpu_time_total
    return total_us / 1000.0


def build_task(loss: str, arch: dict, spatial_dims: int, device: torch.device) -> RegistrationTask:
    feature_net = None
    if FEATURE_NET_OF.get(loss):
        feature_net = build_feature_net(FEATURE_NET_OF[loss], spatial_dims, 1, num_classes=NUM_SEG_CLASSES,
                                        channels=arch["feature_channels"]).to(device)
    similarity = build_similarity(loss, spatial_dims, feature_net=feature_net)
    return RegistrationTask(RegistrationObjective(similarity, arch["lambdas"][loss]).to(device))


def measure(loss: str, args: argparse.Namespace, arch: dict, device: torch.device) -> dict:
    """Train ``warmup + steps + profile_steps`` steps with ``loss``; this rank's numbers."""
    seed_everything(0, deterministic=not args.cudnn_benchmark)
    network = speed_up(build_network("registration_net", {
        "spatial_dims": len(args.size), "in_channels": 1, "channels": arch["registration_channels"],
        "diffeomorphic": False, "half_res": arch["registration_half_res"]}), channels_last=args.channels_last)
    total = args.warmup + args.steps + args.profile_steps
    dataset = SyntheticPairs(args.size, total * distributed.world_size(), device)
    loader = DataLoader(dataset, batch_size=1, sampler=distributed.PassShuffledSampler(dataset, shuffle=False),
                        num_workers=0)
    clock = StepClock(args.warmup, args.steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    extra = {"precision": args.precision} if args.precision else {}  # only when asked: older engines lack it
    trainer = build_trainer(distributed.wrap_ddp(network, device), build_task(loss, arch, len(args.size), device),
                            loader, max_epochs=1, epoch_length=total, device=device, handlers=[clock], **extra)
    trainer.run()
    return {"elapsed_s": clock.elapsed_s, "peak_gib": clock.peak_bytes / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "allreduce_ms_per_step": allreduce_ms(clock.profiler, device) / max(args.profile_steps, 1)}


def gather(value):
    """Every rank's ``value``, in rank order (a one-item list outside a process group)."""
    if not distributed.is_distributed():
        return [value]
    out = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "backend": None, "device": "cpu"}
    if torch.distributed.is_initialized():
        env["backend"] = torch.distributed.get_backend()
    if device.type == "cuda":
        from torch.cuda import nccl

        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, nccl.version())))
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                        f"{torch.get_num_threads()} threads/process)"
    return env


def launch_command(args: argparse.Namespace, argv: list[str]) -> str:
    if args.launch_command:
        return args.launch_command
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nnodes = distributed.world_size() // max(nproc, 1)
    return (f"torchrun --nnodes={nnodes} --nproc_per_node={nproc} benchmarks/ddp_scaling.py "
            + " ".join(argv) + "   # reconstructed")


def write_table(out: Path) -> Path:
    """``ddp_scaling.md`` from every ``n*.json`` in ``out``."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("n*.json"))]
    records.sort(key=lambda r: r["world_size"])
    lines = ["# DDP scaling of registration training", "",
             "Per-GPU efficiency = samples/s at N / (N × samples/s at N = 1) of the same device, size, precision "
             "and loss. All-reduce: summed time of the all-reduce kernels per step (profiled), which overlaps "
             "backward. Written by `benchmarks/ddp_scaling.py`.", "",
             "| device | size | precision | loss | N | steps/s | samples/s | per-GPU efficiency | "
             "peak memory per process (GiB) | all-reduce ms/step (% of step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in records:
        for loss, m in r["results"].items():
            key = (r["env"]["device"], tuple(r["size"]), r["precision"], loss)
            if r["world_size"] == 1:
                base[key] = m["samples_per_s"]
    for r in records:
        for loss, m in r["results"].items():
            key = (r["env"]["device"], tuple(r["size"]), r["precision"], loss)
            eff = m["samples_per_s"] / (r["world_size"] * base[key]) if key in base else None
            peak = max(m["peak_gib"]) if max(m["peak_gib"]) > 0 else max(m["peak_rss_gib"])
            kind = "" if max(m["peak_gib"]) > 0 else " RSS"
            share = 100 * m["allreduce_ms_per_step"] / (1000 / m["steps_per_s"])
            lines.append(f"| {r['env']['device']} | {'×'.join(map(str, r['size']))} | {r['precision']} | {loss} | "
                         f"{r['world_size']} | {m['steps_per_s']:.3f} | {m['samples_per_s']:.3f} | "
                         f"{'—' if eff is None else f'{100 * eff:.1f} %'} | {peak:.2f}{kind} | "
                         f"{m['allreduce_ms_per_step']:.1f} ({share:.1f} %) |")
    lines += ["", "Versions and launch commands:", ""]
    for r in records:
        env = ", ".join(f"{k} {v}" for k, v in r["env"].items() if k != "device" and v is not None)
        lines.append(f"- N = {r['world_size']} ({r['env']['device']}; {env}; {r['steps']} timed steps after "
                     f"{r['warmup']} warm-up; architecture of profile `{r['architecture']['profile']}`): "
                     f"`{r['command']}`")
    path = out / "ddp_scaling.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp_scaling"))
    parser.add_argument("--size", nargs=3, type=int, default=[160, 192, 224], metavar=("D", "H", "W"))
    parser.add_argument("--losses", nargs="+", default=["ncc", "deepsim-seg"])
    parser.add_argument("--profile", default="full", help="profile whose network sizes and λ to use")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the all-reduce time")
    parser.add_argument("--precision", default=None, help="passed to build_trainer when given (fp32, bf16)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights (speed_up)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN autotune (the stages default to deterministic algorithms)")
    parser.add_argument("--launch-command", default=None, help="the exact command line, recorded in the results")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
        parser.error("--steps and --profile-steps must be >= 1 and --warmup >= 0")
    device = distributed.init_from_env() if distributed.launched_by_torchrun() else distributed.local_device()
    arch = architecture(args.profile)
    world = distributed.world_size()
    results = {}
    for loss in args.losses:
        local = measure(loss, args, arch, device)
        ranks = gather(local)
        elapsed = max(r["elapsed_s"] for r in ranks)  # the slowest rank sets the pace
        results[loss] = {"steps_per_s": args.steps / elapsed, "samples_per_s": args.steps * world / elapsed,
                         "step_ms": 1000 * elapsed / args.steps,
                         "peak_gib": [r["peak_gib"] for r in ranks], "peak_rss_gib": [r["peak_rss_gib"] for r in ranks],
                         "allreduce_ms_per_step": sum(r["allreduce_ms_per_step"] for r in ranks) / len(ranks)}
        if distributed.is_main_process():
            print(f"N={world} {loss}: {results[loss]['steps_per_s']:.3f} steps/s, "
                  f"{results[loss]['samples_per_s']:.3f} samples/s, all-reduce "
                  f"{results[loss]['allreduce_ms_per_step']:.1f} ms/step", flush=True)
    if distributed.is_main_process():
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"world_size": world, "size": args.size, "precision": args.precision or "fp32",
                  "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps,
                  "architecture": arch, "env": environment(device), "command": launch_command(args, argv),
                  "results": results}
        (args.out / f"n{world}.json").write_text(json.dumps(record, indent=1))
        print(write_table(args.out).read_text(), flush=True)
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main()
