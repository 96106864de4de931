"""``deepsim`` command line.

``deepsim run`` is the main job; ``deepsim reproduce`` the paper reproduction (all losses, datasets, seeds, noise);
``deepsim sweep`` the λ selection; ``deepsim register`` / ``deepsim warp`` register users' own images and apply
saved fields; ``deepsim bundle-path`` locates a MONAI bundle. ``python -m deepsim`` is the same command.
Results go to stdout, progress messages to stderr (``-q`` keeps warnings only, ``-v`` adds debug messages and the
INFO lines of MONAI and MLflow; :mod:`deepsim.console`).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from deepsim import __version__, console
from deepsim.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, DeepsimError, UsageError, exit_code

__all__ = ["main", "build_parser", "LOSSES"]

#: the similarity losses, listed in the help texts; equal to deepsim.losses.SIMILARITY_NAMES
#: (tested), spelled out here so that ``deepsim --help`` does not import torch and MONAI
LOSSES = ("mse", "ncc", "ncc-sup", "nmi", "mind", "deepsim-ae", "deepsim-seg", "dice")

_EPILOG = """examples:
  deepsim run                              # whole pipeline on the embedded brains (CPU, ~12 min)
  deepsim run --profile quick --out /tmp/q # tiny data, seconds: checks an installation
  deepsim run --losses mse deepsim-seg     # only some losses
  deepsim run --tracking-uri http://mlflow.example:5000
  deepsim run --resume --out deepsim_output  # continue a killed run where it stopped
  deepsim sync-runs --from sqlite:///deepsim_output/mlflow.db --to http://mlflow.example:5000
  torchrun --standalone --nproc_per_node=4 -m deepsim run --distributed --profile full   # 4 GPUs, DDP
  deepsim reproduce                        # paper reproduction, CPU scale: brains + cells, 3 seeds, noise study
  deepsim reproduce --scale full --datasets brain_mri --device cuda   # 1 mm brains on a GPU
  deepsim sweep --profile paper_cells --losses mse ncc --grid 0.1 1 10
  deepsim register --fixed F.nii.gz --moving M.nii.gz --out reg/   # your own images, shipped brain model
  deepsim warp --field reg/ddf_mm.nii.gz --image M_seg.nii.gz --label --out M_seg_warped.nii.gz
  deepsim compare --from deepsim_output     # our models vs ANTs SyN and elastix (pip install ".[compare]" in a clone)
  python -m monai.bundle run --config_file "['$(deepsim bundle-path)/configs/common.json','$(deepsim bundle-path)/configs/train_feature_seg.json']"

exit status:
  0 success; 1 a problem with input files, configs, checkpoints, output folders, tracking stores or devices
  (one line on stderr: "deepsim: error: <Type>: <what>: <problem>"); 2 a wrong command line (unknown flag or a
  value of the wrong form); 130 interrupted (Ctrl-C). deepsim never overwrites files it did not write: a non-empty
  --out folder it did not create needs --overwrite (docs/reliability.md).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deepsim run: error: argument --seed: ... (see deepsim run --help)``, exit 2
    (argparse's own prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _value(kind, check, wanted: str):
    """An argparse ``type`` converting with ``kind`` and accepting values where ``check(value)`` holds."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    convert.__name__ = wanted  # argparse names the type in some messages
    return convert


_SEED = _value(int, lambda v: 0 <= v < 2**32, "an integer seed from 0 to 2**32 - 1")
_POSITIVE = _value(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_NON_NEGATIVE = _value(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_COUNT = _value(int, lambda v: v >= 0, "an integer >= 0")
_PAIRS = _value(int, lambda v: v >= 1, "an integer >= 1")


def _device(text: str) -> str:
    from deepsim.devices import parse_device

    try:
        return parse_device(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _add_output_options(parser: argparse.ArgumentParser, out_default: str, out_help: str) -> None:
    """The options every training command shares: output folder, MLflow URI, device, progress bars."""
    parser.add_argument("--out", type=Path, default=Path(out_default), help=out_help)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    parser.add_argument("--device", type=_device, default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars (they are drawn only when stderr is a terminal anyway)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out folder that deepsim did not create (files of the names "
                        "deepsim writes are replaced; the user's other files and data are never deleted)")


def _add_verbosity(parser: argparse.ArgumentParser, default=0) -> None:
    """-q/-v on the main parser and on every command (``deepsim run -q`` and ``deepsim -q run`` alike)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="only warnings and errors on stderr, no progress bars")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="also debug messages and the INFO lines of MONAI and MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deepsim",
        description="Learned image registration with semantic (DeepSim) similarity metrics: data -> feature "
        "pretraining -> registration training -> evaluation, tracked in MLflow.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deepsim {__version__}")
    _add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the whole pipeline (the main job)",
        description="Prepare the data, pretrain the feature nets the chosen losses need, train one registration "
        "network per loss, evaluate all of them and the identity on held-out test pairs, and print the table. "
        "Everything is logged to MLflow (one parent run, nested runs per stage).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--profile", default="default",
                     help="'default' (embedded brains, 2 mm, CPU minutes), 'quick' (tiny test data), 'full' "
                     "(1 mm, GPU) or a path to a profile JSON")
    _add_output_options(run, "deepsim_output", "output folder: data/, models/, report/ and the MLflow store mlflow.db")
    run.add_argument("--losses", nargs="+", default=None, metavar="LOSS",
                     help="similarity losses to train (default: the profile's list), any of: " + " ".join(LOSSES))
    run.add_argument("--seed", type=_SEED, default=0, help="random seed (data synthesis, pairs, initialisation)")
    run.add_argument("--distributed", action="store_true",
                     help="data-parallel training (DDP) on every process of a torchrun job: launch as torchrun "
                     "--nproc_per_node=N -m deepsim.cli run --distributed ... (docs/distributed.md)")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --out (same profile, seed and losses): finished stages "
                     "are skipped, the interrupted one restarts from its last training state, in the same MLflow runs")
    run.add_argument("--tracking-fallback", choices=["none", "local"], default="none",
                     help="if --tracking-uri is unreachable: 'none' stops at start-up, 'local' logs to "
                     "<out>/mlflow.db with a warning (copy the runs over later with deepsim sync-runs)")
    rep = sub.add_parser(
        "reproduce",
        help="reproduce the paper: every loss, every dataset, several seeds, noise study, one report",
        description="Train every similarity loss of the paper on every dataset of the experiment config with several "
        "seeds, evaluate on held-out test pairs with and without added noise, and write a Markdown report (tables "
        "with Wilcoxon tests, the paper's claims, box plots, smoothness-vs-noise plot, qualitative figure). "
        "Everything is logged to MLflow under one parent run. Finished seeds are reused when run again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument("--scale", choices=["quick", "full"], default="quick",
                     help="'quick': CPU scale (configs/experiments/paper_cpu.json); 'full': 1 mm brains for a GPU "
                     "(paper_gpu.json)")
    rep.add_argument("--config", default=None, help="an experiment config name or JSON path (overrides --scale)")
    rep.add_argument("--datasets", nargs="+", default=None, metavar="NAME", help="subset of the config's datasets")
    rep.add_argument("--seeds", nargs="+", type=_SEED, default=None, help="override the config's seeds")
    _add_output_options(rep, "deepsim_reproduce", "output folder: one folder per dataset and seed, report/, mlflow.db")
    rep.add_argument("--no-resume", action="store_true", help="retrain seeds whose results already exist in --out")
    swp = sub.add_parser(
        "sweep",
        help="choose the regularisation weight λ per loss on validation pairs",
        description="Train each loss over a grid of λ (same data, steps and seed), score each on the validation "
        "pairs, and pick λ per loss: the highest validation Dice among λ with mean folding ≤ --max-folding "
        "percent (ties within 0.002 Dice go to the larger λ). Writes sweep.csv/.md/.png and chosen.json; "
        "--update-profile writes the choice into a profile JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    swp.add_argument("--profile", default="paper_brain", help="profile name or JSON path")
    swp.add_argument("--losses", nargs="+", default=None, metavar="LOSS",
                     help="losses (default: the profile's), any of: " + " ".join(LOSSES))
    grid = swp.add_mutually_exclusive_group()
    grid.add_argument("--grid", nargs="+", type=_NON_NEGATIVE, default=None, metavar="LAMBDA",
                      help="the same λ values for every loss (default: 0.0625 0.25 1 4)")
    grid.add_argument("--relative", nargs="+", type=_POSITIVE, default=None, metavar="FACTOR",
                      help="per-loss grids: each loss's current λ (profile, else bundle default) times these factors")
    swp.add_argument("--max-folding", type=_NON_NEGATIVE, default=1.0, help="folding %% allowed for a chosen λ")
    _add_output_options(swp, "deepsim_sweep", "output folder: data/, models/, sweep/ and mlflow.db")
    swp.add_argument("--update-profile", type=Path, nargs="+", default=None, metavar="JSON",
                     help="write the chosen λ into the 'lambdas' map of these profile files")
    swp.add_argument("--seed", type=_SEED, default=0, help="random seed")
    rp = sub.add_parser(
        "report",
        help="rebuild a reproduction report from all_results.csv files (e.g. datasets run on different machines)",
        description="Merge the all_results.csv of one or more `deepsim reproduce` runs and write the report "
        "(tables, tests, claims, plots) again, without training anything.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rp.add_argument("--results", nargs="+", type=Path, required=True, metavar="CSV", help="all_results.csv files")
    rp.add_argument("--config", default="paper_cpu", help="experiment config whose published figures to show")
    rp.add_argument("--out", type=Path, required=True, help="folder for the Markdown report and its PNGs")
    rp.add_argument("--name", default="paper_cpu", help="report file name (without .md)")
    rp.add_argument("--qualitative", nargs="*", default=[], metavar="DATASET=PNG",
                    help="qualitative figures to copy beside the report")
    rp.add_argument("--note", action="append", default=[], help="a line for the report header (repeatable)")
    rp.add_argument("--command", dest="made_by", default=None,
                    help="the command(s) that produced the results, for the header")
    rg = sub.add_parser(
        "register",
        help="register your own moving image to a fixed image (affine + network + instance optimisation)",
        description="Register MOVING to FIXED (NIfTI, 2D or 3D, any size, spacing and orientation). By default the "
        "accurate path: an affine stage (torch: centre-of-mass start, pyramid, global NCC or MI), the model's "
        "predicted field on a working grid at its training spacing (RAS), then instance optimisation of a "
        "diffeomorphic transform on the pair (coarse-to-fine, greedy compositive updates, the model's loss). "
        "--network-only gives the network's prediction alone (fastest), --no-network the classical path. The "
        "result is mapped back onto the fixed image's own grid. Writes into --out: warped.nii.gz (fixed grid, "
        "affine and header), ddf_mm.nii.gz (the whole transform as a displacement field in mm, LPS components: "
        "ITK's DisplacementFieldTransform, SimpleITK and ANTs apply it — except for a fixed image with sheared "
        "voxel axes, which ITK cannot represent: then only nibabel and deepsim warp read it), jacobian_det.nii.gz, "
        "warped_label.nii.gz (with --moving-label), affine.tfm (the affine stage, ITK format) and "
        "registration.json (Dice before/after with both label maps, folding %%, std log|J|, stages, timings, the "
        "contrast decision, warnings, inverse consistency), and ddf_mm_inverse.nii.gz, the inverse transform on the "
        "moving image's grid (deepsim warp --field brings fixed-image labels onto the moving image with it). "
        "--transform picks the instance optimisation's model: greedy (default), symmetric (both images move "
        "half-way, as ANTs SyN; not with the deepsim-* losses) or svf. "
        "Contrast: by default (--contrast auto) deepsim measures whether the two images share a contrast (a T1 "
        "against a T2 or PD image correlates negatively inside the brain) and picks the path: one contrast, the NCC "
        "affine, the network and the model's loss; different contrasts, the mutual-information affine and the NMI "
        "loss, without the network (trained on one contrast). Give --contrast same or different when you know. "
        "A result that looks wrong (less similar than the inputs, an implausible affine: scale, shear, reflection, "
        "a huge shift; a declared contrast the images contradict) is reported as a 'deepsim: warning:' line and in "
        "registration.json's warnings. "
        "Nothing is written if any step fails; --out must be a new or empty folder, or one deepsim register wrote "
        "(--overwrite for others), and no output ever replaces an input.",
        epilog="examples:\n"
        "  deepsim register --fixed sub-01_T1w.nii.gz --moving sub-02_T1w.nii.gz --out reg/   # shipped brain model\n"
        "  deepsim register --fixed F.nii.gz --moving M.nii.gz --fixed-label FL.nii.gz --moving-label ML.nii.gz "
        "--out reg/\n"
        "  deepsim register --fixed F.nii.gz --moving M.nii.gz --network-only --out reg/   # network alone, fastest\n"
        "  deepsim register --fixed T1w.nii.gz --moving T2w.nii.gz --contrast different --out reg/   # T1 to T2\n"
        "  deepsim register --fixed F.nii.gz --moving M.nii.gz --model deepsim_output --similarity mse --out reg/\n"
        "  deepsim register --pairs pairs.csv --out reg/        # many pairs, model loaded once\n"
        "  deepsim register --fixed F.nii.gz --moving M.nii.gz --model models:/deepsim-brain_mri@best --tracking-uri "
        "sqlite:///deepsim_output/mlflow.db --out reg/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rg.add_argument("--fixed", type=Path, default=None, help="fixed image (NIfTI)")
    rg.add_argument("--moving", type=Path, default=None, help="moving image (NIfTI)")
    rg.add_argument("--pairs", type=Path, default=None, metavar="CSV",
                    help="instead of --fixed/--moving: register every pair of this CSV (columns fixed, moving and "
                    "optionally fixed_label, moving_label, name; paths relative to the CSV) into --out/<name>/, "
                    "with the model loaded once; writes --out/registrations.csv")
    rg.add_argument("--fixed-label", type=Path, default=None, help="label map of the fixed image (for Dice)")
    rg.add_argument("--moving-label", type=Path, default=None, help="label map of the moving image, warped too")
    rg.add_argument("--model", default=None,
                    help="a registration checkpoint (.pt), a folder holding registration_*.pt (a deepsim run output "
                    "or bundle folder), an MLflow run (runs:/<id> or the run id) or an MLflow model "
                    "(models:/<name>/<version>, models:/<name>@<alias>; deepsim run registers deepsim-<experiment>"
                    "@best). Default: the pretrained brain model shipped with deepsim (1 mm T1-weighted, "
                    "skull-stripped)")
    rg.add_argument("--similarity", default=None,
                    help="which model of a folder/run holding several: " + " ".join(LOSSES))
    rg.add_argument("--spacing", type=_POSITIVE, default=None, metavar="MM",
                    help="the model's training voxel spacing, for checkpoints that do not record it (with "
                    "--no-network: the spacing of the grid the optimisation runs on; default the fixed image's)")
    rg.add_argument("--out", type=Path, required=True,
                    help="output folder (new, empty, or one deepsim register wrote before; see --overwrite)")
    rg.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty folder deepsim did not create, replacing files of the output names "
                    "(never an input)")
    stages = rg.add_argument_group("stages (default: affine, network, instance optimisation)")
    stages.add_argument("--affine", dest="affine", action="store_true", default=True,
                        help="the affine stage (the default; kept for old command lines)")
    stages.add_argument("--no-affine", dest="affine", action="store_false",
                        help="skip the affine stage: the images are already aligned in world space")
    stages.add_argument("--contrast", choices=["auto", "same", "different"], default="auto",
                        help="whether the two images share an MRI contrast (T1w to T1w: same; T1w to T2w, FLAIR or "
                        "PDw: different); auto (default) measures it. It picks the defaults of --affine-metric, "
                        "--loss and the network (same: ncc, the model's loss, the network; different: mi, nmi, "
                        "no network); options given explicitly win")
    stages.add_argument("--affine-metric", choices=["ncc", "mi"], default=None,
                        help="affine metric: global NCC (same contrast) or mutual information (different contrasts); "
                        "default: from --contrast")
    stages.add_argument("--no-network", dest="network", action="store_false", default=None,
                        help="skip the network: affine + instance optimisation from the identity (classical)")
    stages.add_argument("--network-only", action="store_true",
                        help="the network's prediction alone: no affine stage, no instance optimisation (fastest; "
                        "needs images roughly aligned like the model's training pairs)")
    stages.add_argument("--iterations", type=_COUNT, nargs="+", default=None, metavar="N",
                        help="instance optimisation steps per pyramid level (shrink 4, 2, 1; default: 50 30 15), "
                        "or one number for all levels; each level also stops on a loss plateau; 0: no instance "
                        "optimisation")
    stages.add_argument("--transform", choices=["greedy", "symmetric", "svf"], default=None,
                        help="instance optimisation transform model: greedy compositive updates, symmetric "
                        "(both images move half-way, as ANTs SyN) or a stationary velocity field (default: greedy; "
                        "see docs/instance_optimisation.md)")
    stages.add_argument("--loss", default=None,
                        choices=["ncc", "mse", "mind", "nmi", "deepsim-ae", "deepsim-seg"],
                        help="instance optimisation loss (default: from --contrast: the model's own for one "
                        "contrast, nmi for different contrasts; deepsim-* need the model's feature net beside it)")
    stages.add_argument("--learning-rate", type=_POSITIVE, default=None,
                        help="instance optimisation: the longest step, in voxels of each level (default: 0.5)")
    rg.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu or cuda:0")
    rg.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --model runs:/... or models:/...")
    rg.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cp = sub.add_parser(
        "compare",
        help="compare our stages with ANTs SyN, elastix and FireANTs on the same test pairs",
        description="Register the held-out test pairs of a `deepsim run` output folder with the identity, ANTs SyN "
        "(antspyx), elastix B-spline (itk-elastix), FireANTs, our stages (affine; affine+io; every trained network "
        "alone; <loss>+io: affine, network, instance optimisation) and score all with the same code (Dice and Dice "
        "per label group, HD95, folding, std log|J|, time per pair, peak memory, Wilcoxon against the best), log "
        "one nested MLflow run per method and write compare.md, results.csv and compare.png. The classical tools "
        "are an optional extra: pip install \".[compare]\" from the repository (antspyx==0.6.3, "
        "itk-elastix==0.25.4, fireants==1.5.0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cp.add_argument("--from", dest="run_dir", type=Path, default=Path("deepsim_output"),
                    help="a `deepsim run` output folder (data/ and models/)")
    cp.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                    help="subset of: identity ants-syn elastix-bspline fireants affine affine+io <loss> <loss>+io "
                    "for each trained loss (default: all of these); also affine+<loss> (affine, then the network) "
                    "and <net>+io-<loss> / affine+io-<loss> (another instance optimisation loss: ncc, mse, mind, nmi, "
                    "deepsim-ae, deepsim-seg)")
    cp.add_argument("--max-pairs", type=_PAIRS, default=None, help="only the first N test pairs (quick checks)")
    cp.add_argument("--table", type=Path, default=None,
                    help="also copy the Markdown report here (e.g. benchmarks/results/compare_brain_mri_cpu.md)")
    _add_output_options(cp, "deepsim_compare", "output folder: compare.md, results.csv, compare.png")
    wp = sub.add_parser(
        "warp",
        help="apply a saved displacement field (ddf_mm.nii.gz) to an image or label map",
        description="Resample IMAGE through FIELD (a displacement field written by deepsim, or by ITK/ANTs: NIfTI "
        "vector, mm, LPS components) and write the result with the field's grid and affine. IMAGE may lie on any "
        "grid (usually the moving image's own): it is read at the world points x + d(x), as ITK's Resample does. "
        "Linear interpolation (0 outside), or nearest neighbour with --label (label values preserved).",
    )
    wp.add_argument("--field", type=Path, required=True, help="displacement field NIfTI")
    wp.add_argument("--image", type=Path, required=True, help="image or label map to warp")
    wp.add_argument("--out", type=Path, required=True,
                    help="output NIfTI path (.nii.gz or .nii); never one of the inputs")
    wp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    wp.add_argument("--label", action="store_true", help="nearest-neighbour resampling of a label map")
    _add_cohort_parsers(sub)
    sy = sub.add_parser(
        "sync-runs",
        help="copy MLflow runs from one tracking store to another (e.g. a local fallback store to the server)",
        description="Copy every run of the source store (or of --experiment) to the destination: params, tags, "
        "metric histories, artifacts, status and times, with nested runs under their copied parents. Runs copied "
        "before (tag deepsim.synced_from) are skipped, so it can run again after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sy.add_argument("--from", dest="source", required=True, help="source tracking URI, e.g. sqlite:///out/mlflow.db")
    sy.add_argument("--to", dest="destination", required=True, help="destination tracking URI, e.g. http://host:5000")
    sy.add_argument("--experiment", nargs="+", default=None, metavar="NAME", help="only these experiments")
    bp = sub.add_parser("bundle-path", help="print the folder of an installed MONAI bundle")
    bp.add_argument("name", nargs="?", default="brain_mri", help="bundle name: brain_mri or cells_2d")
    for command in sub.choices.values():
        _add_verbosity(command, default=argparse.SUPPRESS)
    return parser


def _add_cohort_parsers(sub) -> None:
    """``deepsim cohort`` (a BIDS App: BIDS_DIR OUTPUT_DIR participant|group) and ``deepsim cohort-example``."""
    co = sub.add_parser(
        "cohort", help="register a whole BIDS study to a template and back; group QC report (docs/cohort.md)",
        description="participant: register every T1w image of BIDS_DIR (or of --subjects CSV) to the template and "
        "write BIDS derivatives into OUTPUT_DIR (the T1w in template space, both transforms as ITK displacement "
        "fields, the atlas in each subject, the Jacobian determinant); subjects already complete are skipped, a "
        "failed subject is recorded (failures.csv) and the others go on (exit 1 at the end). group: the metrics "
        "table, outliers and overlays in OUTPUT_DIR/group_report.html, one MLflow run for the study. Under torchrun "
        "the subjects are shared among the ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    co.add_argument("bids_dir", type=Path, metavar="BIDS_DIR", help="the BIDS dataset (read only; '-' with --subjects)")
    co.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the derivatives folder")
    co.add_argument("analysis_level", choices=["participant", "group"], help="participant or group")
    co.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL", help="only these subjects")
    co.add_argument("--subjects", type=Path, default=None, metavar="CSV",
                    help="instead of BIDS_DIR: a CSV with columns subject, t1w[, session, labels]")
    co.add_argument("--template", default=None, help="MNI152NLin2009aSym[:res-N] (shipped, the default) or a NIfTI T1")
    co.add_argument("--atlas", default=None, help="label map on the template's grid (default: its tissue classes)")
    co.add_argument("--labels-dir", default=None, help="derivatives with sub-X[_ses-Y]_desc-<atlas>_dseg.nii.gz "
                    "per subject, in the atlas's labels, for Dice")
    co.add_argument("--speed", choices=["accurate", "fast"], default="accurate",
                    help="fast: instance optimisation stops at half resolution (the CPU schedule)")
    co.add_argument("--model", default=None, help="registration model (as deepsim register --model); default shipped")
    co.add_argument("--transform", choices=["greedy", "symmetric", "svf"], default=None,
                    help="instance optimisation transform model, as deepsim register --transform (default: greedy)")
    co.add_argument("--device", type=_device, default="cpu", help="torch device (under torchrun: each rank's GPU)")
    co.add_argument("--batch-size", type=_PAIRS, default=1, help="subjects registered together")
    co.add_argument("--workers", type=_COUNT, default=0, help="DataLoader processes reading the images")
    co.add_argument("--tracking-uri", default=None, help="MLflow URI (group; default sqlite:///OUTPUT_DIR/mlflow.db)")
    co.add_argument("--overwrite", action="store_true", help="write into a non-empty folder deepsim did not create")
    co.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ex = sub.add_parser("cohort-example", help="write a small BIDS study made from the embedded brains",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("bids_dir", type=Path, metavar="BIDS_DIR", help="a new or empty folder")
    ex.add_argument("--subjects", type=_PAIRS, default=8, help="number of subjects")
    ex.add_argument("--spacing", type=_POSITIVE, default=2.0, metavar="MM", help="voxel size")
    ex.add_argument("--seed", type=_SEED, default=0, help="random seed")


def _cohort(args: argparse.Namespace) -> int:
    from deepsim.errors import DatasetError

    if args.analysis_level == "group":
        from deepsim.workflows.cohort_group import run_group

        result = run_group(args.output_dir, args.tracking_uri, "deepsim " + " ".join(sys.argv[1:]))
        print(f"{len(result['rows'])} subjects, {len(result['failed'])} failed: {result['report']}")
        if result["failed"]:
            raise DatasetError(f"{len(result['failed'])} subject(s) failed; see {result['failures']}")
        return 0
    from deepsim.workflows.cohort import CohortSettings, run_cohort

    bids_dir = None if str(args.bids_dir) == "-" else args.bids_dir
    if bids_dir is None and args.subjects is None:
        raise UsageError("BIDS_DIR '-' needs --subjects CSV")
    settings = CohortSettings(template=args.template, atlas=args.atlas, speed=args.speed, model=args.model,
                              device=args.device, batch_size=args.batch_size, workers=args.workers,
                              labels_dir=args.labels_dir, progress=not args.no_progress, transform=args.transform)
    run, total = run_cohort(bids_dir, args.output_dir, settings, args.participant_label, args.subjects,
                            args.overwrite)
    print(f"{len(run.done)} registered, {total - len(run.done) - len(run.failed)} already complete or another "
          f"rank's, {len(run.failed)} failed: {args.output_dir}")
    if run.failed:
        first = next(iter(run.failed.items()))
        raise DatasetError(f"{len(run.failed)} subject(s) failed ({first[0]}: {first[1]}); see "
                           f"{args.output_dir / 'failures.csv'}")
    return 0


def _user_error(exc: BaseException) -> DeepsimError | None:
    """Find our own error in an exception chain (MONAI's config parser wraps the errors of what it builds)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DeepsimError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _own(args: argparse.Namespace, command: str):
    """Hold ``args.out`` for ``command``: refused if deepsim did not create it (without --overwrite) or if another
    deepsim process is writing there (:mod:`deepsim.output_folder`)."""
    from deepsim.output_folder import own_output_folder

    return own_output_folder(args.out, command, args.overwrite)


def _check_command_line(args: argparse.Namespace) -> None:
    """What argparse cannot check alone, before any work: loss names, and that ``--device`` exists here."""
    from deepsim.devices import check_available

    if getattr(args, "losses", None):
        from deepsim.losses import SIMILARITY_NAMES

        unknown = [loss for loss in args.losses if loss not in SIMILARITY_NAMES]
        if unknown:
            raise UsageError(f"--losses: unknown losses {unknown}; choose from {list(SIMILARITY_NAMES)}")
    check_available(getattr(args, "device", None))


def _run(args: argparse.Namespace) -> int:
    from deepsim.workflow import load_profile, run_pipeline

    profile = load_profile(args.profile)
    if args.distributed:
        return _run_distributed(args, profile)
    summary, uri = run_pipeline(profile, args.out, tracking_uri=args.tracking_uri, losses=args.losses,
                                device=args.device, seed=args.seed, progress=not args.no_progress,
                                resume=args.resume, tracking_fallback=args.tracking_fallback == "local",
                                overwrite=args.overwrite)
    _print_run_summary(summary, uri, args.out)
    return _uploads_done()


def _uploads_done() -> int:
    """0, or a TrackingError listing the MLflow uploads that failed during the job (after its output is printed)."""
    from deepsim.tracking.mlflow_tracking import raise_failed_uploads

    raise_failed_uploads()
    return 0


def _sync_runs(args: argparse.Namespace) -> int:
    from deepsim.tracking.sync import sync_runs

    copied = sync_runs(args.source, args.destination, experiments=args.experiment)
    for source_id, new_id in copied:
        print(f"{source_id} -> {new_id}")
    print(f"{len(copied)} run(s) copied from {args.source} to {args.destination}")
    return _uploads_done()


def _run_distributed(args: argparse.Namespace, profile) -> int:
    """``deepsim run --distributed``: one torchrun process; rank 0 prints the table."""
    from deepsim.engine import distributed
    from deepsim.errors import ConfigError
    from deepsim.workflow import run_pipeline

    if not distributed.launched_by_torchrun():
        raise ConfigError("--distributed needs torchrun's environment: launch as torchrun --nproc_per_node=N "
                          "-m deepsim.cli run --distributed ... (docs/distributed.md)")
    cpu = args.device is not None and args.device.startswith("cpu")
    distributed.init_from_env(backend="gloo" if cpu else None)
    try:
        summary, uri = run_pipeline(profile, args.out, tracking_uri=args.tracking_uri, losses=args.losses,
                                    device=args.device, seed=args.seed, progress=not args.no_progress,
                                    distributed=True, resume=args.resume,
                                    tracking_fallback=args.tracking_fallback == "local", overwrite=args.overwrite)
    finally:
        distributed.destroy()
    if summary is not None:
        _print_run_summary(summary, uri, args.out)
    return _uploads_done()


def _stage_comparisons(results_csv: Path) -> list[str]:
    """The paired comparisons of the hybrids against the affine and network rows (none without results)."""
    import pandas as pd

    from deepsim.evaluation.summary import stage_comparisons

    return stage_comparisons(pd.read_csv(results_csv)) if results_csv.is_file() else []


def _print_run_summary(summary, uri: str, out: Path) -> None:
    from deepsim.evaluation.summary import format_table
    from deepsim.tracking.mlflow_tracking import ui_command

    print()
    print(f"Test pairs: {int(summary['n_pairs'].iloc[0])} (held-out subjects only)")
    print(format_table(summary))
    for line in _stage_comparisons(Path(out) / "report" / "results.csv"):
        print(line)
    print()
    print(f"Report (CSV, Markdown, figures): {Path(out).resolve() / 'report'}")
    print(f"Open the runs in MLflow:  {ui_command(uri)}")


def _reproduce(args: argparse.Namespace) -> int:
    from deepsim.experiments.reproduce import load_experiment, run_reproduction

    experiment = load_experiment(args.config or ("paper_cpu" if args.scale == "quick" else "paper_gpu"))
    via_cli = sys.argv[0].endswith(("deepsim", "cli.py", "__main__.py"))
    command = "deepsim " + " ".join(sys.argv[1:]) if via_cli else "deepsim reproduce"
    with _own(args, "deepsim reproduce"):
        path, _ = run_reproduction(experiment, args.out, datasets=args.datasets, seeds=args.seeds, device=args.device,
                                   tracking_uri=args.tracking_uri, progress=not args.no_progress,
                                   resume=not args.no_resume, command=command,
                                   report_name=experiment.name)
    print(path.read_text())
    return _uploads_done()


def _report(args: argparse.Namespace) -> int:
    import shutil

    import pandas as pd

    from deepsim.errors import ConfigError
    from deepsim.experiments.report import write_report
    from deepsim.experiments.reproduce import load_experiment
    from deepsim.io import atomic_write

    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise ConfigError(f"results file(s) not found: {', '.join(missing)}")
    results = pd.concat([pd.read_csv(p) for p in args.results], ignore_index=True)
    experiment = load_experiment(args.config)
    published = {d["name"]: d["published"] for d in experiment.datasets if d.get("published")}
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for item in args.qualitative:
        dataset, _, png = item.partition("=")
        if not png or not Path(png).is_file():
            raise ConfigError(f"--qualitative {item!r}: expected DATASET=PNG with an existing PNG")
        figures[dataset] = args.out / f"{args.name}_{dataset}_qualitative.png"
        if Path(png).resolve() != figures[dataset].resolve():
            atomic_write(figures[dataset], lambda tmp, png=png: shutil.copyfile(png, tmp))
    path = write_report(results, args.out, args.made_by or "deepsim report " + " ".join(sys.argv[2:]), published,
                        figures, "\n\n".join(args.note), args.name)
    print(path)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from deepsim.experiments.sweep import DEFAULT_GRID, format_sweep, relative_grid, run_sweep, update_profile
    from deepsim.workflow import load_profile

    profile = load_profile(args.profile)
    losses = args.losses or profile.losses
    grid = relative_grid(profile, losses, args.relative) if args.relative else (args.grid or DEFAULT_GRID)
    with _own(args, "deepsim sweep"):
        table, chosen = run_sweep(profile, args.out, losses, grid,
                                  seed=args.seed, device=args.device, tracking_uri=args.tracking_uri,
                                  progress=not args.no_progress, max_folding_pct=args.max_folding)
    print(format_sweep(table, chosen, profile.name, args.max_folding))
    for path in args.update_profile or []:
        update_profile(path, chosen)
        print(f"chosen λ written to {path}")
    return _uploads_done()


def _compare(args: argparse.Namespace, command: list[str]) -> int:
    from deepsim.experiments.compare_run import run_comparison

    with _own(args, "deepsim compare"):
        text = run_comparison(args.run_dir, args.out, methods=args.methods, max_pairs=args.max_pairs,
                              tracking_uri=args.tracking_uri, device=args.device or "cpu",
                              progress=not args.no_progress, table=args.table, command=" ".join(command))
    print(text)
    return _uploads_done()


def _register_stages(args: argparse.Namespace) -> dict:
    """The stage options of ``deepsim register`` as keyword arguments of ``register_files``."""
    if args.network_only and args.network is False:
        raise UsageError("--network-only and --no-network exclude each other")
    if args.network_only and args.transform is not None:
        raise UsageError(f"--transform {args.transform} names the instance optimisation's model, which "
                         "--network-only skips; leave out one of them")
    if args.network_only:
        return {"affine": False, "network": True, "iterations": 0, "contrast": args.contrast}
    return {"affine": args.affine, "network": args.network, "iterations": args.iterations, "loss": args.loss,
            "learning_rate": args.learning_rate, "affine_metric": args.affine_metric, "contrast": args.contrast,
            "transform": args.transform}


def _register(args: argparse.Namespace) -> int:
    import json

    from deepsim.registration.inference import register_files, register_pairs

    if args.pairs is not None:
        if args.fixed or args.moving or args.fixed_label or args.moving_label:
            raise UsageError("--pairs replaces --fixed/--moving/--fixed-label/--moving-label; give one or the other")
        rows = register_pairs(args.pairs, args.out, model=args.model, device=args.device, similarity=args.similarity,
                              tracking_uri=args.tracking_uri, spacing_mm=args.spacing, **_register_stages(args),
                              progress=not args.no_progress, overwrite=args.overwrite)
        for row in rows:
            dice = "" if row["dice_after"] is None else f"Dice {row['dice_before']:.4f} -> {row['dice_after']:.4f}; "
            print(f"{row['name']}: {dice}folding {row['folding_pct']:.4f} %; {row['seconds']:.2f} s")
        print(f"{len(rows)} pairs registered into {args.out} (summary: {args.out / 'registrations.csv'})")
        return 0
    if args.fixed is None or args.moving is None:
        raise UsageError("deepsim register needs --fixed and --moving (or --pairs CSV)")
    written = register_files(args.fixed, args.moving, args.out, model=args.model, fixed_label=args.fixed_label,
                             moving_label=args.moving_label, device=args.device, similarity=args.similarity,
                             tracking_uri=args.tracking_uri, spacing_mm=args.spacing, **_register_stages(args),
                             progress=not args.no_progress, overwrite=args.overwrite)
    report = json.loads(written["report"].read_text())
    for name, path in written.items():
        print(f"{name:13s} {path}")
    summary = [f"{key} {report[key]:.4f}" for key in ("dice_before", "dice_after_affine", "dice_after",
                                                        "folding_pct", "std_log_jacobian") if key in report]
    contrast = report["contrast"]
    how = "detected" if contrast["requested"] == "auto" else "given"
    relation = "not measured" if contrast["relation"] is None else f"rank correlation {contrast['relation']:.2f}"
    summary.append(f"contrast {contrast['used']} ({how}; {relation})")
    print("; ".join(summary + [f"time {report['timings']['total_s']:.2f} s"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one ``deepsim`` command; returns the exit status (see the epilog: 0, 1, 2 or 130)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 0
    console.configure(args.verbosity)
    if hasattr(args, "no_progress"):  # bars only when asked for, not quieted and on a terminal
        args.no_progress = not console.progress_enabled(not args.no_progress)
    # Emitted by torch inside MONAI's Warp on every call; not actionable for users.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    # MONAI's Warp announces its (only) backend on construction: noise before our one-line errors.
    warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native grid_sample")
    try:
        _check_command_line(args)
        if args.command == "bundle-path":
            from deepsim.resources import bundle_dir

            print(bundle_dir(args.name))
            return 0
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "sync-runs":
            return _sync_runs(args)
        if args.command == "compare":
            # the report names the command as a user types it (no path of this machine's virtualenv)
            return _compare(args, ["deepsim", *(sys.argv[1:] if argv is None else argv)])
        if args.command == "register":
            return _register(args)
        if args.command == "cohort":
            return _cohort(args)
        if args.command == "cohort-example":
            from deepsim.data.example_study import make_example_dataset

            print(make_example_dataset(args.bids_dir, args.subjects, args.spacing, args.seed))
            return 0
        if args.command == "warp":
            from deepsim.registration.inference import apply_field

            print(apply_field(args.field, args.image, args.out, label=args.label, overwrite=args.overwrite))
            return 0
        return _run(args)
    except KeyboardInterrupt:
        print("deepsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        error = _user_error(exc)
        if error is not None:
            print(f"deepsim: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
            return exit_code(error)
        system = _system_error(exc)
        if system is None:
            raise  # a bug in deepsim: the traceback is what a bug report needs
        print(f"deepsim: error: {type(system).__name__}: {_one_line(system)}", file=sys.stderr)
        return EXIT_FAILURE


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _system_error(exc: BaseException) -> OSError | None:
    """The operating system's error in an exception chain (permission denied, disk full, read-only file system):
    the machine's state, not a deepsim bug, so reported in one line."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
