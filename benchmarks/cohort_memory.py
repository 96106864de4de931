"""Host memory over a cohort loop: the resident set size (RSS) of ``deepsim cohort ... participant`` sampled every
0.5 s while it registers N subjects, against the number of subjects finished. Flat means no growth per subject
(what ANTsPy #678 and ANTs #1557 report for loops of registrations).

    python benchmarks/cohort_memory.py --subjects 24 --spacing 2 --out benchmarks/results/cohort_memory_cpu.md

The study is the example study (``deepsim cohort-example``) at ``--spacing``, the template the shipped MNI152 at
the same resolution, ``--speed fast``; the model an untrained network at that spacing (memory, not accuracy, is
measured; the trained 1 mm model would put the working grid at 1 mm). RSS includes the DataLoader workers
(children) as well.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from deepsim.data.example_study import make_example_dataset
    from deepsim.engine.checkpoints import save_checkpoint
    from deepsim.registration.network import RegistrationNet

    work = Path(tempfile.mkdtemp(prefix="cohort-memory-"))
    raw = make_example_dataset(work / "raw", n_subjects=args.subjects, spacing_mm=args.spacing)
    kwargs = dict(spatial_dims=3, in_channels=1, channels=[8, 16, 16, 16])
    torch.manual_seed(0)
    model = save_checkpoint(work / "model.pt", RegistrationNet(**kwargs), "registration_net", kwargs,
                            meta={"similarity": "ncc", "spacing_mm": args.spacing})
    command = [sys.executable, "-m", "deepsim.cli", "cohort", str(raw), str(work / "out"), "participant",
               "--template", f"MNI152NLin2009aSym:res-{args.spacing:g}", "--model", str(model), "--speed", "fast",
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress",
               "--labels-dir", str(raw / "derivatives" / "labels")]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = psutil.Process(proc.pid)
    samples: list[tuple[float, int, float]] = []

    def sample() -> None:
        while proc.poll() is None:
            done = len(list((work / "out").glob("sub-*/anat/*_registration.json")))
            samples.append((time.perf_counter() - started, done, _rss_mb(process)))
            time.sleep(0.5)

    thread = threading.Thread(target=sample)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"cohort failed ({proc.returncode}): {err}")
    peak_by_done: dict[int, float] = {}
    for _, done, rss in samples:
        peak_by_done[done] = max(peak_by_done.get(done, 0.0), rss)
    lines = ["# Host memory over a cohort loop (CPU)", "",
             f"`python benchmarks/cohort_memory.py --subjects {args.subjects} --spacing {args.spacing:g} "
             f"--workers {args.workers} --batch-size {args.batch_size} --out {args.out}`", "",
             f"{args.subjects} subjects of the example study at {args.spacing:g} mm, template "
             f"MNI152NLin2009aSym:res-{args.spacing:g}, `--speed fast`, an untrained network at {args.spacing:g} mm; "
             f"2-core CPU shared with other jobs (load average {psutil.getloadavg()[0]:.1f} at the end). "
             f"Wall {wall:.0f} s ({wall / args.subjects:.1f} s per subject). RSS of the main process plus its "
             "DataLoader workers, sampled every 0.5 s; the peak while N subjects were finished:", "",
             "| subjects finished | peak RSS (MiB) |", "|---:|---:|"]
    lines += [f"| {n} | {peak_by_done[n]:.0f} |" for n in sorted(peak_by_done)]
    firsts = [peak_by_done[n] for n in sorted(peak_by_done) if n >= 2]
    if len(firsts) >= 2:
        half = len(firsts) // 2
        lines += ["", f"Peak RSS over the first half of the loop (after 2 subjects) {max(firsts[:half]):.0f} MiB, "
                  f"over the second half {max(firsts[half:]):.0f} MiB "
                  f"({max(firsts[half:]) - max(firsts[:half]):+.0f} MiB)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
