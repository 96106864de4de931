"""Registration training-step time with cuDNN's deterministic algorithms vs autotuning (``seed_everything``).

    python benchmarks/determinism_step_time.py --device cuda --shape 160 192 160 --steps 20

Prints one line per mode: median seconds per step (MSE + diffusion, batch 1, random images) after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepsim.engine.checkpoints import build_network
from deepsim.engine.trainer import seed_everything
from deepsim.registration.objective import build_objective
from deepsim.spatial import warp_image


def step_times(device: str, shape: list[int], steps: int, deterministic: bool, half_res: bool) -> list[float]:
    seed_everything(0, deterministic)
    net = build_network("registration_net", {"spatial_dims": len(shape), "in_channels": 1,
                                             "channels": [16, 32, 32, 32], "diffeomorphic": False,
                                             "half_res": half_res}).to(device)
    objective = build_objective("mse", 0.05, spatial_dims=len(shape), device=device)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    fixed, moving = torch.rand(1, 1, *shape, device=device), torch.rand(1, 1, *shape, device=device)
    times = []
    for i in range(steps + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        ddf = net(moving, fixed)
        loss = objective(warp_image(moving, ddf), fixed, ddf)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", nargs="+", type=int, default=[80, 96, 80])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--half-res", action="store_true")
    args = parser.parse_args()
    for deterministic in (True, False):
        t = step_times(args.device, args.shape, args.steps, deterministic, args.half_res)
        print(f"{args.device} shape {args.shape} half_res {args.half_res} deterministic={deterministic}: "
              f"median {statistics.median(t) * 1000:.1f} ms/step over {len(t)} steps", flush=True)


if __name__ == "__main__":
    main()
