"""Evaluate registration methods on the held-out test pairs: one table, per-label Dice, figures.

Methods are ``identity`` (no registration: the floor), the names of trained similarity losses, whose networks
are read from ``<models_dir>/registration_<name>.pt``, and the stages of the accurate path
(:func:`deepsim.registration.pipeline.method_registrar`): ``affine`` and ``<loss>+io`` (affine, the network, then
instance optimisation). Every method sees the same pairs and the same metric code
(:mod:`deepsim.evaluation.summary`). The Jacobian statistics are taken over the whole fixed grid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from deepsim.data.noise import add_gaussian_noise
from deepsim.engine.checkpoints import (
    load_checkpoint,
    load_network,
    registration_checkpoint_path,
)
from deepsim.evaluation import figures
from deepsim.evaluation.jacobian import jacobian_determinant
from deepsim.evaluation.summary import format_table, pair_metrics, stage_comparisons, summarise
from deepsim.io import atomic_write
from deepsim.registration.pipeline import method_registrar, parse_method
from deepsim.spatial import warp_image, warp_labels

__all__ = ["evaluate_methods", "register_pair", "register_pair_with"]


def register_pair(network, pair: dict, device: torch.device | str) -> dict[str, torch.Tensor | float]:
    """Register one PairDataset item: ``fixed``, ``moving`` (1, 1, *S), ``ddf`` (1, ndim, *S) voxels, ``warped_label``
    (1, 1, *S) by nearest neighbour, and ``seconds`` spent predicting the field. ``network=None`` is the identity.
    """
    fixed = torch.as_tensor(pair["fixed"])[None].float().to(device)
    moving = torch.as_tensor(pair["moving"])[None].float().to(device)
    start = time.perf_counter()
    if network is None:
        ddf = torch.zeros((1, fixed.ndim - 2, *fixed.shape[2:]), device=fixed.device)
    else:
        ddf = network(moving, fixed)
    seconds = time.perf_counter() - start
    warped_label = warp_labels(torch.as_tensor(pair["moving_label"])[None].to(device), ddf)
    return {"fixed": fixed, "moving": moving, "ddf": ddf, "warped_label": warped_label, "seconds": seconds}


def register_pair_with(registrar, pair: dict, device: torch.device | str, spacing_mm: float) -> dict:
    """:func:`register_pair` through a :class:`~deepsim.registration.pipeline.Registrar` (affine and instance
    optimisation stages); ``seconds`` is the whole registration. Both images lie on one grid of ``spacing_mm``."""
    fixed = torch.as_tensor(pair["fixed"])[None].float().to(device)
    moving = torch.as_tensor(pair["moving"])[None].float().to(device)
    start = time.perf_counter()
    ddf = registrar.on_grid(fixed[0, 0], moving[0, 0], spacing_mm).voxel_ddf()
    seconds = time.perf_counter() - start
    warped_label = warp_labels(torch.as_tensor(pair["moving_label"])[None].to(device), ddf)
    return {"fixed": fixed, "moving": moving, "ddf": ddf, "warped_label": warped_label, "seconds": seconds}


class _AffineOnce:
    """An affine stage shared by every method of one evaluation: fitted once per test pair (and settings), so the
    rows that start with it (``affine``, ``affine+<loss>``, ``<loss>+io``) start from the same transform and the
    fit is paid once. ``reused_s``: the seconds of the fit the last call reused (0 when it fitted), which the row's
    time includes, so ``inference_s`` stays the time of the whole registration."""

    def __init__(self, stage, fits: dict):
        self.stage, self.fits, self.pair, self.reused_s = stage, fits, None, 0.0

    def __call__(self, fixed, fixed_affine, moving, moving_affine):
        key = (self.pair, repr(self.stage))
        if key in self.fits:
            self.reused_s = float(self.fits[key].seconds)
            return self.fits[key]
        self.reused_s = 0.0
        self.fits[key] = self.stage(fixed, fixed_affine, moving, moving_affine)
        return self.fits[key]


def _uses_registrar(method: str) -> bool:
    """Methods with an affine or optimisation stage; the identity and a network alone keep the old path."""
    affine, _, io_loss = parse_method(method)
    return affine or io_loss is not None


@torch.no_grad()
def evaluate_methods(
    datalist_path: str | Path,
    models_dir: str | Path,
    methods: Sequence[str],
    report_dir: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    split: str = "test",
    noise_std: float = 0.0,
    noise_seed: int = 0,
    figures_enabled: bool = True,
) -> pd.DataFrame:
    """Register every ``split`` pair with every method; write CSVs, a Markdown summary and PNGs to ``report_dir``.

    ``noise_std > 0`` adds Gaussian noise of that std (intensity units, images in [0, 1]) to both images of every
    pair before registration (labels untouched); pair ``i`` gets the same noise for every method
    (:func:`deepsim.data.noise.add_gaussian_noise` with keys ``2i``, ``2i+1``). Results rows carry ``noise_std``.

    Returns the summary (one row per method). Files: ``results.csv`` (method x pair), ``dice_per_label.csv``,
    ``summary.md``, ``overlay_<method>.png``, ``grid_<method>.png``, ``jacobian_<method>.png``, ``dice_boxplot.png``
    (the PNGs only with ``figures_enabled``).
    """
    from tqdm.auto import tqdm

    from deepsim.data.pairs import PairDataset

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    pairs = PairDataset(datalist_path, split)
    spacing = float(json.loads(Path(datalist_path).read_text()).get("spacing_mm", 1.0))
    rows, label_rows = [], []
    affine_fits: dict = {}  # one affine fit per pair, shared by the methods (_AffineOnce)
    for method in methods:
        network, registrar, train_time = None, None, float("nan")
        loss = parse_method(method)[1]
        if loss is not None:
            ckpt = registration_checkpoint_path(models_dir, loss)
            train_time = float(load_checkpoint(ckpt)["meta"].get("train_time_s", float("nan")))
        if _uses_registrar(method):
            registrar = method_registrar(method, models_dir, device)
            if registrar.affine is not None:
                registrar.affine = _AffineOnce(registrar.affine, affine_fits)
        elif method != "identity":
            network = load_network(ckpt, map_location=device, builder="registration_net").to(device).eval()
        for i in tqdm(range(len(pairs)), desc=f"evaluate {method}", disable=not progress, unit="pair"):
            pair = pairs[i]
            if noise_std > 0:
                pair = {**pair, "fixed": add_gaussian_noise(pair["fixed"], noise_std, noise_seed, 2 * i),
                        "moving": add_gaussian_noise(pair["moving"], noise_std, noise_seed, 2 * i + 1)}
            if registrar is None:
                out = register_pair(network, pair, device)
            else:
                if registrar.affine is not None:
                    registrar.affine.pair = pair["pair_id"]
                out = register_pair_with(registrar, pair, device, spacing)
                out["seconds"] += registrar.affine.reused_s if registrar.affine is not None else 0.0
            fixed, moving, ddf, seconds = out["fixed"], out["moving"], out["ddf"], out["seconds"]
            # metrics on the registration device: at 1 mm the CPU metrics cost more than the GPU registration
            metrics, per_label = pair_metrics(torch.as_tensor(pair["fixed_label"]).to(device), out["warped_label"][0],
                                              ddf)
            rows.append({"method": method, "pair_id": pair["pair_id"], "fixed_id": pair["fixed_id"],
                         "moving_id": pair["moving_id"], **metrics, "inference_s": seconds, "train_time_s": train_time,
                         "noise_std": float(noise_std)})
            label_rows += [{"method": method, "pair_id": pair["pair_id"], "label": k, "dice": v}
                           for k, v in per_label.items()]
            if i == 0 and figures_enabled:
                warped = warp_image(moving, ddf)
                figures.plot_registration_overlay(fixed[0, 0].cpu(), moving[0, 0].cpu(), warped[0, 0].cpu(),
                                                  report_dir / f"overlay_{method}.png")
                figures.plot_deformation_grid(ddf[0].cpu(), report_dir / f"grid_{method}.png")
                figures.plot_jacobian(jacobian_determinant(ddf)[0].cpu(), report_dir / f"jacobian_{method}.png")
    results = pd.DataFrame(rows)
    summary = summarise(results)
    atomic_write(report_dir / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    atomic_write(report_dir / "dice_per_label.csv", lambda tmp: pd.DataFrame(label_rows).to_csv(tmp, index=False))
    table = format_table(summary)
    comparisons = stage_comparisons(results)
    if comparisons:  # each stage's share, paired over the test pairs
        table += "\n" + "\n".join(f"- {line}" for line in comparisons) + "\n"
    atomic_write(report_dir / "summary.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    if not figures_enabled:
        return summary
    figures.plot_dice_boxplot(results, report_dir / "dice_boxplot.png")
    report = _report_markdown(table, results, methods, split)
    atomic_write(report_dir / "report.md", lambda tmp: Path(tmp).write_text(report))
    return summary


def _report_markdown(table: str, results: pd.DataFrame, methods: Sequence[str], split: str) -> str:
    """The report page: table, what the numbers mean, and the figures of the first pair per method."""
    first = results.iloc[0]
    lines = [
        "# Registration report", "",
        f"{results['pair_id'].nunique()} {split} pairs (fixed → moving, subjects never seen in training).", "",
        table, "",
        "Dice: mean over the labels present in the fixed label map (nearest-neighbour warped labels), then mean ± "
        "std over pairs. Folding: % of voxels with det J ≤ 0. std log|J|: std of log det J over voxels with "
        "det J > 0 (not Learn2Reg's clipped SDlogJ). Jacobian statistics over the whole fixed grid.", "",
        "![Dice per pair](dice_boxplot.png)", "",
        f"## First pair: {first['moving_id']} → {first['fixed_id']}", "",
    ]
    for method in methods:
        lines += [f"### {method}", "", f"![overlay](overlay_{method}.png)", "",
                  f"![deformation grid](grid_{method}.png) ![Jacobian determinant](jacobian_{method}.png)", ""]
    return "\n".join(lines)
