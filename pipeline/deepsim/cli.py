"""``deepsim`` command line. ``deepsim run`` is the main job; ``deepsim bundle-path`` locates the MONAI bundle."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from deepsim.errors import DeepsimError

__all__ = ["main", "build_parser"]

_EPILOG = """examples:
  deepsim run                              # whole pipeline on the embedded brains (CPU, ~12 min)
  deepsim run --profile quick --out /tmp/q # tiny data, seconds: checks an installation
  deepsim run --losses mse deepsim-seg     # only some losses
  deepsim run --tracking-uri http://mlflow.example:5000
  python -m monai.bundle run --config_file "['$(deepsim bundle-path)/configs/common.json','$(deepsim bundle-path)/configs/train_feature_seg.json']"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepsim",
        description="Learned image registration with semantic (DeepSim) similarity metrics: data -> feature "
        "pretraining -> registration training -> evaluation, tracked in MLflow.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    run.add_argument("--out", type=Path, default=Path("deepsim_output"),
                     help="output folder: data/, models/, report/ and the MLflow store mlflow.db")
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    run.add_argument("--losses", nargs="+", default=None, metavar="LOSS",
                     help="similarity losses to train (default: the profile's list): mse ncc deepsim-ae deepsim-seg")
    run.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    run.add_argument("--seed", type=int, default=0, help="random seed (data synthesis, pairs, initialisation)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_parser("bundle-path", help="print the folder of the installed brain_mri MONAI bundle")
    return parser


def _user_error(exc: BaseException) -> DeepsimError | None:
    """Find our own error in an exception chain (MONAI's config parser wraps the errors of what it builds)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DeepsimError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _run(args: argparse.Namespace) -> int:
    from deepsim.evaluation.summary import format_table
    from deepsim.tracking.mlflow_tracking import ui_command
    from deepsim.workflow import load_profile, run_pipeline

    profile = load_profile(args.profile)
    summary, uri = run_pipeline(profile, args.out, tracking_uri=args.tracking_uri, losses=args.losses,
                                device=args.device, seed=args.seed, progress=not args.no_progress)
    print()
    print(f"Test pairs: {int(summary['n_pairs'].iloc[0])} (held-out subjects only)")
    print(format_table(summary))
    print()
    print(f"Report (CSV, Markdown, figures): {Path(args.out).resolve() / 'report'}")
    print(f"Open the runs in MLflow:  {ui_command(uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Emitted by torch inside MONAI's Warp on every call; not actionable for users.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    try:
        if args.command == "bundle-path":
            from deepsim.workflow import bundle_dir

            print(bundle_dir())
            return 0
        return _run(args)
    except KeyboardInterrupt:
        print("deepsim: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"deepsim: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
