"""Pretraining on unlimited synthetic label-driven pairs, on the GPU, resumable in short calls.

``python -m deepsim.workflows.pretrain --bank bank_1mm.npz --stage registration --loss dice --out models/``

One stage per call, through the one training engine (:func:`deepsim.engine.trainer.build_trainer`) like every
bundle stage: the data loader is a :class:`~deepsim.data.synthetic_stream.SyntheticStream` of
:class:`~deepsim.data.synth.LabelPairSynth` pairs drawn on the training device from a
:class:`~deepsim.data.label_bank.LabelBank`; the stages are

- ``registration``: the registration network on synthetic pairs with any registration loss — ``dice`` (the labels'
  soft Dice, SynthMorph's loss), ``ncc``, ``deepsim-seg``/``deepsim-ae`` (feature nets from ``--out``) ...;
- ``feature_seg`` / ``feature_ae``: the DeepSim feature nets on synthetic images, every image a new random
  contrast, so their features learn to ignore contrast.

Every ``--eval-every`` iterations (an engine epoch) the epoch's mean training values, and for registration the mean
Dice of the network alone on ``--validation`` pairs (a prepared datalist's ``validation`` split), are appended to
``<out>/<stage>.curve.csv`` (:class:`~deepsim.tracking.curve.CurveLog`). The training state is saved every
``--checkpoint-every`` iterations and when ``--time-limit`` stops the call; ``--resume`` continues it, so a long
training is a chain of calls that carry ``--out`` from one machine to the next. The checkpoint
(``registration_<loss>.pt`` or ``feature_<kind>.pt``) holds the network's constructor arguments and, in its meta,
the generator's settings, the iterations and the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "train"]

_log = logging.getLogger("deepsim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepsim.workflows.pretrain",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bank", required=True, type=Path, help="label bank file (python -m deepsim.workflows.label_bank)")
    p.add_argument("--out", required=True, type=Path, help="models folder: checkpoint, training state, curve")
    p.add_argument("--stage", choices=("registration", "feature_seg", "feature_ae"), default="registration")
    p.add_argument("--loss", default="dice", help="registration loss (a similarity name; registration stage only)")
    p.add_argument("--regularization-weight", type=float, default=1.0, help="λ of the diffusion regulariser")
    p.add_argument("--steps", type=int, default=20000, help="planned training iterations in all")
    p.add_argument("--eval-every", type=int, default=500, help="iterations per curve point (an engine epoch)")
    p.add_argument("--time-limit", type=float, default=None, help="stop this call after so many seconds")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<checkpoint>.state.pt")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="network channels per level (registration default 32 64 64 64 64; features 32 64 128)")
    p.add_argument("--full-res", action="store_true", help="registration U-Net at full resolution (default: half)")
    p.add_argument("--no-diffeomorphic", action="store_true", help="a displacement head instead of an SVF")
    p.add_argument("--validation", type=Path, default=None, help="datalist whose 'validation' pairs score the curve")
    p.add_argument("--validation-pairs", type=int, default=6)
    p.add_argument("--shapes-probability", type=float, default=0.0, help="share of random 'shapes' label maps")
    p.add_argument("--same-contrast", action="store_true", help="one contrast per pair (default: one per image)")
    p.add_argument("--synth", nargs="*", default=[], metavar="NAME=VALUE",
                   help="other generator settings (deepsim.data.synth.SynthOptions), e.g. max_rotation_deg=3")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    return p


def _registration_parts(args, bank, device):
    from deepsim.registration.objective import build_objective

    channels = tuple(args.channels or (32, 64, 64, 64, 64))
    kwargs = {"spatial_dims": len(bank.shape), "in_channels": 1, "channels": channels,
              "diffeomorphic": not args.no_diffeomorphic, "half_res": not args.full_res}
    objective = build_objective(args.loss, args.regularization_weight, spatial_dims=len(bank.shape),
                                models_dir=args.out, device=device, label_values=range(bank.num_classes))
    from deepsim.engine.checkpoints import registration_checkpoint_path
    from deepsim.engine.tasks import RegistrationTask

    return ("registration_net", kwargs, RegistrationTask(objective), "pairs",
            registration_checkpoint_path(args.out, args.loss))


def _feature_parts(args, bank):
    from deepsim.engine.checkpoints import feature_checkpoint_path
    from deepsim.engine.tasks import ReconstructionTask, SegmentationTask

    kind = args.stage.removeprefix("feature_")
    channels = tuple(args.channels or (32, 64, 128))
    kwargs = {"kind": kind, "spatial_dims": len(bank.shape), "in_channels": 1, "channels": channels,
              "num_classes": bank.num_classes if kind == "seg" else None}
    task = SegmentationTask(range(bank.num_classes)) if kind == "seg" else ReconstructionTask()
    return "feature_net", kwargs, task, "images", feature_checkpoint_path(args.out, kind)


def _synth_overrides(items: Sequence[str]) -> dict:
    """``NAME=VALUE`` strings as generator settings, each value read as JSON (numbers, lists) or kept as text."""
    from deepsim.data.synth import SynthOptions

    known = {f.name for f in dataclasses.fields(SynthOptions)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--synth {item!r}: expected NAME=VALUE with NAME one of {sorted(known)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def train(args: argparse.Namespace) -> Path:
    """Run (or continue) one pretraining stage; returns the checkpoint path."""
    import numpy as np
    import torch

    from deepsim.data.label_bank import LabelBank
    from deepsim.data.synth import LabelPairSynth
    from deepsim.data.synthetic_stream import SyntheticStream
    from deepsim.engine.checkpoints import build_network
    from deepsim.engine.resume import TrainingState
    from deepsim.engine.trainer import EpochAverages, SaveNetwork, build_trainer, seed_everything
    from deepsim.engine.validation import ValidationDice
    from deepsim.tracking.curve import CurveLog

    if args.steps % args.eval_every:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(args.seed, deterministic=False)
    args.out.mkdir(parents=True, exist_ok=True)
    bank = LabelBank.load(args.bank, device=device)
    synth_kwargs = {"shapes_probability": args.shapes_probability, "same_contrast": args.same_contrast}
    synth_kwargs.update(_synth_overrides(args.synth))
    if args.stage != "registration":
        # a feature net's labels name left and right structures: a flipped image would teach it to swap them
        synth_kwargs["flip_probability"] = 0.0
    synth = LabelPairSynth(bank, **synth_kwargs)
    synth_kwargs = dataclasses.asdict(synth.options)  # every setting, for the checkpoint's meta
    if args.stage == "registration":
        builder, kwargs, task, view, checkpoint = _registration_parts(args, bank, device)
    else:
        builder, kwargs, task, view, checkpoint = _feature_parts(args, bank)
    stream = SyntheticStream(synth, batch_size=args.batch_size, seed=args.seed, device=device, view=view)
    network = build_network(builder, kwargs)
    curve = CurveLog(checkpoint.with_suffix(".curve.csv"), args.eval_every)
    averages = EpochAverages(log_fn=curve)
    meta = {"stage": args.stage, "pairs": "synthetic", "bank": args.bank.name, "bank_sources": list(bank.sources),
            "class_values": [int(v) for v in bank.class_values], "synth": synth_kwargs, "seed": args.seed,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "precision": args.precision,
            "spacing_mm": float(np.linalg.norm(bank.affine[:3, 0]))}
    if args.stage == "registration":
        meta.update(similarity=args.loss, regularization_weight=args.regularization_weight)
    save = SaveNetwork(checkpoint, builder, kwargs, meta)
    handlers = [averages]
    if args.validation is not None and args.stage == "registration":
        handlers.append(ValidationDice(args.validation, num_pairs=args.validation_pairs, log_fn=curve))
    handlers += [save, TrainingState(checkpoint, every=args.checkpoint_every, resume=args.resume,
                                     stateful={"train_averages": averages, "save_network": save},
                                     fingerprint={"seed": args.seed, "stage": args.stage, "loss": args.loss,
                                                  "learning_rate": args.learning_rate,
                                                  "batch_size": args.batch_size, "bank": args.bank.name,
                                                  "synth": " ".join(sorted(args.synth))})]
    trainer = build_trainer(network, task, stream, max_epochs=args.steps // args.eval_every,
                            learning_rate=args.learning_rate, epoch_length=args.eval_every, device=device,
                            handlers=handlers, time_limit_s=args.time_limit, precision=args.precision)
    trainer.run()
    _log.info("%s: iteration %d of %d", checkpoint, trainer.state.iteration, args.steps)
    (args.out / f"{checkpoint.stem}.progress.json").write_text(json.dumps(
        {"iteration": int(trainer.state.iteration), "planned": args.steps}))
    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[deepsim] %(message)s")
    train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
