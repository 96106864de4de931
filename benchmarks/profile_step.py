"""Where the time of one registration training step and one inference goes on a GPU (160×192×224, NCC).

Companion of ``benchmarks/speed.py``: it separates the engine's overhead from the GPU's work.

- training: the engine (``build_trainer``, as the bundles train) against a bare loop of the same operations, with
  and without reading the loss back to the host every step (a device synchronisation);
- inference: eager fp32 (deterministic cuDNN) and eager bf16 + channels-last + cuDNN autotuning (MONAI's ``Warp``
  indexes with a Python list, a host-to-device copy that CUDA-graph capture refuses, so no graph variant);
- ``torch.profiler`` tables of three engine steps after warm-up: by device time, by host time, and the host-to-device
  copies with their Python stacks.

    python benchmarks/profile_step.py --out /tmp/profile --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402

from deepsim.engine.tasks import RegistrationTask  # noqa: E402
from deepsim.engine.trainer import autocast  # noqa: E402
from deepsim.registration.objective import RegistrationObjective  # noqa: E402
from deepsim.losses import LocalNCCLoss  # noqa: E402


def bare_loop(size, device, steps: int, warmup: int, read_loss: bool) -> float:
    case = speed.Case("bare", precision="bf16", channels_last=True, cudnn_benchmark=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    net = speed.our_network(case, device)
    task = RegistrationTask(RegistrationObjective(LocalNCCLoss(3, 9), 1.0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    batch = {"fixed": speed.smooth_volumes(1, size, device, 1), "moving": speed.smooth_volumes(1, size, device, 2)}

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with autocast(device, "bf16"):
                out = task(net, batch, device)
            out["loss"].backward()
            opt.step()
            if read_loss:
                float(out["loss"])

    run(warmup)
    speed.sync(device)
    start = time.perf_counter()
    run(steps)
    speed.sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def inference_variants(size, device, runs: int) -> dict:
    out = {}
    for name, case in (("eager fp32, deterministic", speed.Case("i", precision="fp32")),
                       ("eager bf16 + channels-last + autotuning",
                        speed.Case("i", precision="bf16", channels_last=True, cudnn_benchmark=True))):
        torch.backends.cudnn.benchmark = case.cudnn_benchmark
        torch.backends.cudnn.deterministic = not case.cudnn_benchmark
        net = speed.our_network(case, device).eval()
        out[name] = speed.inference_ms(net, case, size, device, runs)
    return out


def profile_engine(size, device, out_dir: Path) -> None:
    from ignite.engine import Events
    from torch.profiler import ProfilerActivity, profile, schedule

    case = speed.Case("p", precision="bf16", channels_last=True, cudnn_benchmark=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    net = speed.our_network(case, device)
    task = RegistrationTask(RegistrationObjective(LocalNCCLoss(3, 9), 1.0))
    batch = {"fixed": speed.smooth_volumes(1, size, device, 1), "moving": speed.smooth_volumes(1, size, device, 2)}
    trainer = speed.build_trainer(net, task, [batch] * 10, max_epochs=1, device=device, precision="bf16")
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                   schedule=schedule(wait=4, warmup=2, active=3, repeat=1))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: prof.step())
    with prof:
        trainer.run()
    avg = prof.key_averages()
    (out_dir / "profile_by_cuda.txt").write_text(avg.table(sort_by="self_cuda_time_total", row_limit=30,
                                                           max_name_column_width=70))
    (out_dir / "profile_by_cpu.txt").write_text(avg.table(sort_by="self_cpu_time_total", row_limit=30,
                                                          max_name_column_width=70))
    stacks = prof.key_averages(group_by_stack_n=8)
    copies = [e for e in stacks if "copy" in e.key or "to_copy" in e.key]
    lines = [f"{e.key} calls={e.count} cpu_total_ms={e.cpu_time_total / 1000:.2f} "
             f"device_ms={getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) / 1000:.2f}\n    "
             + "\n    ".join(e.stack) for e in sorted(copies, key=lambda e: -e.cpu_time_total)[:15]]
    (out_dir / "profile_copies.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--size", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device, size = torch.device(args.device), tuple(args.size)
    torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    ns = argparse.Namespace(warmup=8, steps=args.steps, repeats=3, inference_runs=30)
    case = speed.Case("engine", precision="bf16", channels_last=True, cudnn_benchmark=True)
    results["engine s/step"] = speed.train_ours(case, size, device, ns, {})["s_per_step"]
    results["bare loop, loss read every step, s/step"] = bare_loop(size, device, args.steps, 8, True)
    results["bare loop, no read-back, s/step"] = bare_loop(size, device, args.steps, 8, False)
    results["inference ms"] = inference_variants(size, device, 30)
    print(json.dumps(results, indent=1), flush=True)
    profile_engine(size, device, args.out)
    (args.out / "profile_step.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
