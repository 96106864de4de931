"""``deepsim cohort`` on one GPU at 1 mm: subjects per second end to end, Dice against one-at-a-time, memory, and
FireANTs batched on the same subjects.

Two steps, because a GPU call carries at most 64 MiB (24 synthetic 1 mm subjects do not fit, their donors do):

1. ``prepare`` (CPU, here): copies the six donors' label maps and the DK names into ``--out`` (~3 MB).
2. ``run`` (GPU): writes the example study there (``deepsim.data.example_study``: ``--subjects`` subjects at 1 mm,
   each a donor under a random smooth deformation and head position, synthetic T1 contrast; the template is donor
   12876 with its DK atlas), then

   - ``deepsim cohort`` participant level, batched (``--batch-size``, ``--workers``), timed end to end: files read,
     registered (the default accurate path: affine, the shipped network, instance optimisation 50/30/15), every
     derivative written; peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host RSS (sampled);
   - the same subjects one at a time (batch 1, no workers): the Dice the batch must keep;
   - FireANTs 1.5 batched (affine, then greedy, the settings of ``deepsim.peers.fireants.FireANTs``) on the
     same subjects, each first resampled onto the template grid in world coordinates (FireANTs batches one shape);
     Dice of the subject's DK labels carried by its field, against the template atlas; registration time only.

   Results go to ``--results`` as Markdown (and JSON beside it).

    python benchmarks/cohort_gpu.py prepare --out .gpudata/cohort
    python benchmarks/cohort_gpu.py run --data .gpudata/cohort --subjects 24 --batch-size 4 --workers 6 \\
        --results $OUT/cohort_gpu.md                                                    # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def prepare(out: Path) -> None:
    from deepsim.data.embedded import dk_label_names, embedded_label_paths

    (out / "donors").mkdir(parents=True, exist_ok=True)
    for donor, path in embedded_label_paths().items():
        shutil.copy(path, out / "donors" / f"{donor}.nii.gz")
    (out / "donors" / "names.json").write_text(json.dumps({str(k): v for k, v in dk_label_names().items()}))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"{out}: {size:.1f} MB")


def _peak_rss(stop: threading.Event, box: list) -> None:
    import psutil

    process = psutil.Process()
    while not stop.is_set():
        rss = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
        box[0] = max(box[0], rss)
        time.sleep(0.2)


def _cohort(raw: Path, out: Path, template, batch: int, workers: int, device: str, model: str | None) -> dict:
    import torch

    from deepsim.data.bids import find_t1w
    from deepsim.workflows.cohort import CohortSettings, run_participant

    items = find_t1w(raw, labels_dir=raw / "derivatives" / "labels", atlas=template.atlas_name)
    settings = CohortSettings(device=device, batch_size=batch, workers=workers, writers=8, model=model)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stop, box = threading.Event(), [0]
    sampler = threading.Thread(target=_peak_rss, args=(stop, box))
    sampler.start()
    started = time.perf_counter()
    run = run_participant(items, out, template, settings)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("sub-*/anat/*_registration.json"))]
    dice = [s["metrics"]["dice"] for s in summaries]
    return {"subjects": len(items), "failed": len(run.failed), "wall_s": wall, "subjects_per_s": len(items) / wall,
            "dice": dice, "dice_mean": float(np.mean(dice)), "folding_pct": float(np.mean(
                [s["metrics"]["folding_pct"] for s in summaries])),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), "peak_rss_gib": box[0] / 2**30,
            "batch_size": batch, "workers": workers}


def _fireants(raw: Path, template, batch: int, device: str) -> dict:
    """FireANTs batched on the subjects resampled onto the template grid; Dice of the DK labels it carries."""
    import torch

    sys.path.insert(0, str(HERE))
    from sitk_standin import install

    install()
    import SimpleITK as sitk
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    from deepsim.data.bids import find_t1w
    from deepsim.evaluation.dice import dice_per_label, mean_dice
    from deepsim.io import read_image
    from deepsim.peers.fireants import FireANTs
    from deepsim.geometry import Grid, grid_points, sample_at
    from deepsim.registration.inference import NativeImage, normalise_intensity

    cfg = FireANTs()
    spacing = float(np.linalg.norm(template.affine[:3, 0]))
    grid = Grid(template.shape, template.affine)
    points = grid_points(grid, device, torch.float32)
    fixed_norm = normalise_intensity(NativeImage(Path("t"), template.t1w, template.affine, None))
    atlas = torch.as_tensor(template.atlas, device=device)
    items = find_t1w(raw, labels_dir=raw / "derivatives" / "labels", atlas=template.atlas_name)

    def image(array: np.ndarray):
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing([spacing] * 3)
        return Image(img, device=device)

    dice, seconds = [], 0.0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        movings, labels = [], []
        for item in chunk:
            t1, affine, header = read_image(item.t1w)
            norm = torch.as_tensor(normalise_intensity(NativeImage(item.t1w, t1, affine, header)), device=device)
            movings.append(sample_at(norm, affine, points).cpu().numpy())
            lab, lab_affine, _ = read_image(item.labels)
            labels.append(sample_at(torch.as_tensor(lab.astype(np.int64), device=device), lab_affine, points,
                                    mode="nearest"))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f = BatchedImages([image(fixed_norm) for _ in chunk])
        m = BatchedImages([image(a) for a in movings])
        affine = AffineRegistration(list(cfg.affine_scales), list(cfg.affine_iterations), f, m, loss_type="cc",
                                    optimizer="Adam", optimizer_lr=cfg.affine_lr, cc_kernel_size=cfg.affine_cc_kernel,
                                    progress_bar=False)
        affine.optimize()
        greedy = GreedyRegistration(scales=list(cfg.scales), iterations=list(cfg.iterations), fixed_images=f,
                                    moving_images=m, loss_type="cc", cc_kernel_size=cfg.cc_kernel,
                                    deformation_type="compositive", smooth_grad_sigma=cfg.smooth_grad_sigma,
                                    smooth_warp_sigma=cfg.smooth_warp_sigma, optimizer="adam", optimizer_lr=cfg.lr,
                                    init_affine=affine.get_affine_matrix().detach(), progress_bar=False)
        greedy.optimize()
        with torch.no_grad():
            coords = greedy.get_warped_coordinates(f, m)  # (B, *S, 3) normalised, x first
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        for i, lab in enumerate(labels):
            warped = torch.nn.functional.grid_sample(lab[None, None].float(), coords[i:i + 1], mode="nearest",
                                                     align_corners=True)[0, 0]
            dice.append(mean_dice(dice_per_label(atlas, warped.round().long())))
    return {"subjects": len(items), "registration_s_per_subject": seconds / len(items), "dice": dice,
            "dice_mean": float(np.mean(dice)), "batch_size": batch}


def run(args: argparse.Namespace) -> None:
    import torch

    from deepsim.data.example_study import TEMPLATE_DONOR, make_example_dataset
    from deepsim.data.templates import load_template

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="cohort-gpu-"))
    donors = {p.name.split(".")[0]: p for p in (args.data / "donors").glob("*.nii.gz")}
    names = {int(k): v for k, v in json.loads((args.data / "donors" / "names.json").read_text()).items()}
    t0 = time.perf_counter()
    raw = make_example_dataset(work / "raw", args.subjects, args.spacing, args.seed, label_paths=donors,
                               label_names=names)
    made = time.perf_counter() - t0
    tpl_dir = raw / "derivatives" / "template"
    template = load_template(tpl_dir / f"tpl-donor{TEMPLATE_DONOR}_T1w.nii.gz",
                             tpl_dir / f"tpl-donor{TEMPLATE_DONOR}_desc-dk_dseg.nii.gz")
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device,
               "study_made_s": made}
    results["batched"] = _cohort(raw, work / "batched", template, args.batch_size, args.workers, args.device,
                                 args.model)
    results["one_at_a_time"] = _cohort(raw, work / "single", template, 1, 0, args.device, args.model)
    if not args.no_fireants:
        results["fireants"] = _fireants(raw, template, args.batch_size, args.device)
    b, s = results["batched"], results["one_at_a_time"]
    diff = np.subtract(b["dice"], s["dice"])
    lines = ["# deepsim cohort on one GPU, 1 mm", "",
             f"`python benchmarks/cohort_gpu.py run --data {args.data} --subjects {args.subjects} --batch-size "
             f"{args.batch_size} --workers {args.workers}` on {results['device']}; {args.subjects} subjects of the "
             f"example study at 1 mm (donors under random deformations), template donor {TEMPLATE_DONOR} with its "
             "DK atlas (82 labels); Dice: template atlas vs the subject's labels carried into the template.", "",
             "| run | subjects/s end to end | Dice mean | folding % | peak GPU GiB (per subject) | peak host GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in (("batched", b), ("one at a time", s)):
        lines.append(f"| {name} (batch {r['batch_size']}, {r['workers']} workers) | {r['subjects_per_s']:.2f} | "
                     f"{r['dice_mean']:.4f} | {r['folding_pct']:.4f} | {r['peak_gpu_gib']:.1f} "
                     f"({r['peak_gpu_gib'] / r['batch_size']:.1f}) | {r['peak_rss_gib']:.1f} |")
    lines += ["", f"Dice batched − one at a time, per subject: mean {diff.mean():+.4f}, min {diff.min():+.4f}, "
              f"max {diff.max():+.4f}."]
    if "fireants" in results:
        f = results["fireants"]
        lines += ["", f"FireANTs 1.5 batched ({f['batch_size']} a batch) on the same subjects resampled onto the "
                  f"template grid: Dice {f['dice_mean']:.4f}, {f['registration_s_per_subject']:.2f} s per subject "
                  f"for registration alone ({1 / f['registration_s_per_subject']:.2f} subjects/s, no files read or "
                  "written)."]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--subjects", type=int, default=24)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--workers", type=int, default=6)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cuda")
    r.add_argument("--no-fireants", action="store_true")
    r.add_argument("--spacing", type=float, default=1.0, help="voxel size of the study (1 mm; larger for CPU checks)")
    r.add_argument("--model", default=None, help="registration model (default: the shipped 1 mm network)")
    r.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
