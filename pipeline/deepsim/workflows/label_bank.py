"""Make the label bank of the synthetic-pair generator, once, on the CPU (about 1 MB at 1 mm; carry it to the GPU).

``python -m deepsim.workflows.label_bank --spacing 1 --out bank_1mm.npz [--fsaverage]``

Wires :func:`deepsim.registration.affine.estimate_affine` (the aligner the embedded dataset's ``alignment: affine``
uses) into :func:`deepsim.data.label_bank_build.build_label_bank`, so the bank's maps lie on the grid of the
prepared 1 mm held-out pairs. ``--fsaverage`` adds FreeSurfer's fsaverage (optional extra, FreeSurfer licence:
keep such a bank out of the repository and the bundles). Errors are one line on stderr, exit status ≠ 0, and no
file is left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deepsim.data.datasets import DEFAULT_TRAIN_DONORS
from deepsim.data.label_bank_build import build_label_bank
from deepsim.errors import DatasetError, DeepsimError, exit_code, first_line
from deepsim.registration.affine import estimate_affine

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepsim.workflows.label_bank",
                                     description="Build the label bank of the synthetic training-pair generator.")
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    parser.add_argument("--roi", type=int, nargs=3, default=None, help="grid size (default: the dataset's ROI)")
    parser.add_argument("--donors", nargs="+", default=list(DEFAULT_TRAIN_DONORS), help="training donors")
    parser.add_argument("--fsaverage", action="store_true",
                        help="add FreeSurfer's fsaverage aparc+aseg (optional extra deepsim[fsaverage], "
                             "FreeSurfer licence)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the donor alignment (as the dataset's)")
    args = parser.parse_args(argv)
    try:
        if args.spacing <= 0:
            raise DatasetError(f"--spacing must be positive, got {args.spacing}")
        bank = build_label_bank(estimate_affine, args.spacing, args.roi, args.donors, args.fsaverage, args.seed)
        bank.save(args.out)
    except DeepsimError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    size = args.out.stat().st_size / 2**20
    print(f"{args.out}: {len(bank)} maps {bank.shape}, {bank.num_classes} classes, {size:.2f} MiB "
          f"({', '.join(bank.sources)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
