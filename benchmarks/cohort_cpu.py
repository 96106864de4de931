"""``deepsim cohort --speed fast`` on a 2-core CPU against ANTs SyN, on the same subjects at 1 mm: time per subject
and Dice (the template's DK atlas against each subject's labels carried into the template).

    OMP_NUM_THREADS=2 python benchmarks/cohort_cpu.py --subjects 4 --results benchmarks/results/cohort_cpu.md

Ours: the participant level end to end (files read and written, the shipped network, affine, instance optimisation
stopping at half resolution), seconds per subject from its own summaries (``timings``) and the wall time. ANTs:
antspyx ``registration(type_of_transform="SyN")`` (its default: affine, then SyN at shrink 8/4/2 with
``reg_iterations=(40, 20, 0)``, i.e. stopping at half resolution too) of each subject's T1w to the template, labels
carried with ``apply_transforms(interpolator="nearestNeighbor")``. Expensive (minutes per subject): keep
``--subjects`` small and the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--model", default=None, help="registration model (default: the shipped 1 mm network)")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    import ants
    import torch

    from deepsim.data.bids import find_t1w
    from deepsim.data.example_study import TEMPLATE_DONOR, make_example_dataset
    from deepsim.data.templates import load_template
    from deepsim.evaluation.dice import dice_per_label, mean_dice
    from deepsim.workflows.cohort import CohortSettings, run_participant

    work = Path(tempfile.mkdtemp(prefix="cohort-cpu-"))
    raw = make_example_dataset(work / "raw", args.subjects, args.spacing, seed=0)
    tpl_dir = raw / "derivatives" / "template"
    tpl_t1 = tpl_dir / f"tpl-donor{TEMPLATE_DONOR}_T1w.nii.gz"
    tpl_atlas = tpl_dir / f"tpl-donor{TEMPLATE_DONOR}_desc-dk_dseg.nii.gz"
    template = load_template(tpl_t1, tpl_atlas)
    items = find_t1w(raw, labels_dir=raw / "derivatives" / "labels", atlas="dk")

    started = time.perf_counter()
    run_participant(items, work / "out", template, CohortSettings(speed="fast", model=args.model,
                                                                  batch_size=1, workers=1))
    ours_wall = time.perf_counter() - started
    summaries = [json.loads(p.read_text()) for p in sorted((work / "out").glob("sub-*/anat/*_registration.json"))]
    ours_dice = [s["metrics"]["dice"] for s in summaries]

    fixed = ants.image_read(str(tpl_t1))
    atlas = np.asarray(ants.image_read(str(tpl_atlas)).numpy()).astype(np.int64)
    ants_dice, ants_s = [], []
    for item in items:
        moving = ants.image_read(str(item.t1w))
        t0 = time.perf_counter()
        reg = ants.registration(fixed, moving, type_of_transform="SyN")
        ants_s.append(time.perf_counter() - t0)
        warped = ants.apply_transforms(fixed, ants.image_read(str(item.labels)), reg["fwdtransforms"],
                                       interpolator="nearestNeighbor")
        ants_dice.append(mean_dice(dice_per_label(atlas, np.round(warped.numpy()).astype(np.int64))))
    ours_s = ours_wall / len(items)
    lines = ["# deepsim cohort --speed fast vs ANTs SyN, 2-core CPU", "",
             f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/cohort_cpu.py --subjects {args.subjects} "
             f"--spacing {args.spacing:g} --results {args.results}`; {args.subjects} subjects of the example study at "
             f"{args.spacing:g} mm, template donor {TEMPLATE_DONOR} with its DK atlas.", "",
             "| method | s per subject | Dice mean | Dice per subject |", "|---|---:|---:|---|",
             f"| deepsim cohort --speed fast (end to end, files read and written) | {ours_s:.1f} | "
             f"{np.mean(ours_dice):.4f} | {', '.join(f'{d:.3f}' for d in ours_dice)} |",
             f"| ANTs SyN (antspyx default, registration only) | {np.mean(ants_s):.1f} | {np.mean(ants_dice):.4f} | "
             f"{', '.join(f'{d:.3f}' for d in ants_dice)} |", "",
             f"Ratio of times (ours / ANTs): {ours_s / np.mean(ants_s):.2f}."]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
