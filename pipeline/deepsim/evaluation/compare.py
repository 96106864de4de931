"""``deepsim compare``: our registration stages side by side with ANTs SyN, elastix and FireANTs on the same pairs.

Every method registers the same held-out pairs of a ``deepsim run`` output folder (its ``data/datalist.json`` and
``models/registration_<loss>.pt``). Ours are the stages of :class:`deepsim.registration.pipeline.Registrar`, so
the rows are an ablation: ``affine`` (the affine stage alone), ``affine+io`` (affine, then instance optimisation
from the identity with local NCC), ``<loss>`` (the trained network alone, as it was trained: no affine stage) and
``<loss>+io`` (affine, the network, then instance optimisation with that loss: our hybrid). All are scored by the
same code: Dice (mean over the labels present in the
fixed map, and per label group), HD95 in mm (mean over labels), folding %, std log|J|, wall time per pair and the
process's peak memory above its resident size before the call (Linux ``VmHWM``, reset per call through
``/proc/self/clear_refs``; native allocations of ANTs/elastix included). Each method is tested against the best
one (highest mean Dice) with a paired two-sided Wilcoxon signed-rank test over the pairs.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deepsim.errors import ConfigError, DatasetError
from deepsim.evaluation.summary import format_number, pair_metrics, paired_wilcoxon
from deepsim.io import atomic_write
from deepsim.peers import CLASSICAL_METHODS, TOOL_MODULES
from deepsim.registration.pipeline import HYBRID, is_our_method, method_registrar, parse_method, registrar_params
from deepsim.spatial import warp_labels

__all__ = ["hd95_mm", "peak_memory", "score_pair", "compare_methods", "available_methods", "check_methods"]


def hd95_mm(fixed_label: np.ndarray, warped_label: np.ndarray, spacing_mm: float,
            labels: Sequence[int] | None = None) -> float:
    """Mean over labels of the 95th-percentile symmetric Hausdorff distance (mm), MONAI's metric.

    Each label is cropped to the bounding box of its voxels in both maps before MONAI computes surface distances
    (exact: every surface point lies in that box), which makes 80+ labels affordable. Labels missing from the
    warped map are skipped (their Dice is 0 already).
    """
    import warnings

    from monai.metrics import compute_hausdorff_distance

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    labels = [int(v) for v in np.unique(fixed_label) if v != 0] if labels is None else list(labels)
    values = []
    for value in labels:
        a, b = fixed_label == value, warped_label == value
        if not a.any() or not b.any():
            continue
        union = np.argwhere(a | b)
        lo, hi = np.maximum(union.min(0) - 1, 0), union.max(0) + 2
        box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
        pred = torch.as_tensor(b[box])[None, None].float()
        ref = torch.as_tensor(a[box])[None, None].float()
        values.append(float(compute_hausdorff_distance(pred, ref, percentile=95, spacing=float(spacing_mm))[0, 0]))
    return float(np.mean(values)) if values else float("nan")


def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, float, float]:
    """Run ``fn``; return (its result, wall seconds, peak memory above the start, MiB). On the CPU the process's
    resident memory (NaN off Linux); on a CUDA device the memory PyTorch allocated there (``max_memory_allocated``),
    the device synchronised before and after so the seconds hold all the work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return result, seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        base = _status_kb("VmRSS")
    except OSError:
        base = float("nan")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") if base == base else float("nan")
    return result, seconds, max(peak - base, 0.0) / 1024.0 if peak == peak else float("nan")


def available_methods(models_dir: Path) -> list[str]:
    """identity, the classical tools, our affine and affine+io stages, then every trained loss found in
    ``models_dir`` and its hybrid ``<loss>+io``."""
    trained = sorted(p.stem[len("registration_"):] for p in Path(models_dir).glob("registration_*.pt")
                     if not p.name.endswith(".state.pt"))  # training-state files are not models
    return ["identity", *CLASSICAL_METHODS, "affine", "affine" + HYBRID, *trained,
            *[loss + HYBRID for loss in trained]]


def check_methods(run_dir: str | Path, methods: Sequence[str] | None) -> list[str]:
    """The methods to compare (default: all available), checked before anything is written.

    DatasetError without a datalist; ConfigError for an unknown method or a classical tool not installed.
    """
    import importlib.util

    run_dir = Path(run_dir)
    datalist = run_dir / "data" / "datalist.json"
    if not datalist.is_file():
        raise DatasetError(f"{datalist}: not found; --from must be a `deepsim run` output folder")
    known = available_methods(run_dir / "models")
    trained = [m for m in known if "+" not in m and m not in ("identity", "affine", *CLASSICAL_METHODS)]
    chosen = list(methods or known)
    unknown = [m for m in chosen if m not in known and not is_our_method(m, trained)]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown} for {run_dir}; available: {known}")
    for method in chosen:
        missing = [package for module, package in TOOL_MODULES.get(method, {}).items()
                   if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(f"{method} needs {' and '.join(missing)}: pip install '.[compare]' from the repository, "
                              "or leave it out with --methods")
    return chosen


def _registrar(method: str, models_dir: Path, device: torch.device, spacing_mm: float):
    """(callable fixed, moving -> ddf (ndim, *S) voxels torch, parameters to log)."""
    if method in CLASSICAL_METHODS:
        tool = CLASSICAL_METHODS[method]()
        return (lambda f, m: torch.as_tensor(tool(f, m, spacing_mm))), tool.params()
    registrar = method_registrar(method, models_dir, device)
    params = registrar_params(registrar)
    if registrar.network is not None:
        from deepsim.engine.checkpoints import load_checkpoint, registration_checkpoint_path

        path = registration_checkpoint_path(models_dir, parse_method(method)[1])
        params.update({"checkpoint": str(path), **{k: v for k, v in load_checkpoint(path)["meta"].items()
                                                   if k in ("similarity", "regularization_weight", "iterations")}})

    def run(f: np.ndarray, m: np.ndarray) -> torch.Tensor:
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return registrar.on_grid(as_t(f), as_t(m), spacing_mm).voxel_ddf()[0]

    return run, params


def compare_methods(
    run_dir: str | Path,
    report_dir: str | Path,
    methods: Sequence[str] | None = None,
    label_groups: dict[str, Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
    split: str = "test",
    max_pairs: int | None = None,
    progress: bool = True,
    log_fn: Callable[[str, dict, dict], None] | None = None,
    noise_std: float = 0.0,
    hd95: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Register the ``split`` pairs of ``run_dir`` with every method; write ``results.csv`` and return
    ``(per-pair results, summary)``. ``log_fn(method, params, metrics)`` is called once per method (MLflow).

    ``noise_std > 0``: Gaussian noise of that std (images in [0, 1]) is added to both images of every pair, the
    same noise for every method (:func:`deepsim.data.noise.add_gaussian_noise`, seed 0, keys 2i and 2i + 1); the
    rows carry ``noise_std``. ``hd95=False`` leaves HD95 out (NaN): on the CPU it costs seconds a pair at 1 mm.
    Warping labels and the other metrics run on ``device``."""
    from tqdm.auto import tqdm

    from deepsim.data.pairs import PairDataset

    run_dir, report_dir, device = Path(run_dir), Path(report_dir), torch.device(device)
    methods = check_methods(run_dir, methods)
    datalist = run_dir / "data" / "datalist.json"
    spacing = float(json.loads(datalist.read_text())["spacing_mm"])
    registrars = {m: _registrar(m, run_dir / "models", device, spacing) for m in methods}  # fail before any work
    pairs = PairDataset(datalist, split)
    n = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    rows = []
    for method in methods:
        run, params = registrars[method]
        for i in tqdm(range(n), desc=f"compare {method}", disable=not progress, unit="pair"):
            pair = pairs[i]
            metrics, per_label, warped_t, seconds, peak_mib = score_pair(pair, i, run, device, noise_std)
            warped, fixed_label = warped_t.cpu().numpy(), np.asarray(pair["fixed_label"][0])
            row = {"method": method, "pair_id": pair["pair_id"], "noise_std": float(noise_std), **metrics,
                   "hd95_mm": hd95_mm(fixed_label, warped, spacing) if hd95 else float("nan"), "seconds": seconds,
                   "peak_mib": peak_mib}
            for group, values in (label_groups or {}).items():
                scores = [per_label[v] for v in values if v in per_label]
                row[f"dice_{group}"] = float(np.mean(scores)) if scores else float("nan")
            rows.append(row)
        if log_fn is not None:
            done = pd.DataFrame([r for r in rows if r["method"] == method])
            log_fn(method, params,
                   {k: float(done[k].median() if k == "seconds" else done[k].max() if k == "peak_mib"
                             else done[k].mean()) for k in done.columns if k not in ("method", "pair_id")})
    results = pd.DataFrame(rows)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(report_dir / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    return results, summarise_comparison(results)


def score_pair(pair: dict, index: int, register: Callable[[np.ndarray, np.ndarray], object], device: torch.device,
               noise_std: float = 0.0) -> tuple[dict, dict, torch.Tensor, float, float]:
    """Register one :class:`~deepsim.data.datasets.PairDataset` pair and score it.

    ``register(fixed, moving)`` takes the two (*S) float32 arrays and returns a displacement (ndim, *S) in voxels;
    with ``noise_std > 0`` both images first get Gaussian noise seeded by ``index`` (fixed ``2 index``, moving
    ``2 index + 1``). Returns (metrics of :func:`~deepsim.evaluation.summary.pair_metrics`, per-label Dice, the
    warped moving labels (*S) on ``device``, seconds, peak memory in MiB)."""
    if noise_std > 0:
        from deepsim.data.noise import add_gaussian_noise

        pair = {**pair, "fixed": add_gaussian_noise(pair["fixed"], noise_std, 0, 2 * index),
                "moving": add_gaussian_noise(pair["moving"], noise_std, 0, 2 * index + 1)}
    f = np.asarray(pair["fixed"][0], dtype=np.float32)
    m = np.asarray(pair["moving"][0], dtype=np.float32)
    ddf, seconds, peak_mib = peak_memory(lambda: register(f, m), device)
    ddf = torch.as_tensor(ddf, dtype=torch.float32).to(device)[None]
    warped = warp_labels(torch.as_tensor(pair["moving_label"])[None].to(device), ddf)[0, 0]
    metrics, per_label = pair_metrics(torch.as_tensor(pair["fixed_label"][0]).to(device), warped, ddf)
    return metrics, per_label, warped, seconds, peak_mib


def summarise_comparison(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: means (Dice ± std over pairs, group Dice, HD95, folding, std log|J|), median seconds,
    max peak memory, and the Wilcoxon p-value against the method with the highest mean Dice."""
    grouped = results.groupby("method", sort=False)
    summary = grouped.mean(numeric_only=True)
    summary["dice_std"] = grouped["dice_mean"].std(ddof=1)
    summary["seconds"] = grouped["seconds"].median()
    summary["peak_mib"] = grouped["peak_mib"].max()
    summary["n_pairs"] = grouped["pair_id"].nunique()
    best = str(summary["dice_mean"].idxmax())
    summary["p_vs_best"] = [float("nan") if m == best else paired_wilcoxon(results, m, best) for m in summary.index]
    summary.attrs["best"] = best
    return summary


def comparison_table(summary: pd.DataFrame) -> str:
    """Markdown table of :func:`summarise_comparison`."""
    groups = [c for c in summary.columns if c.startswith("dice_") and c not in ("dice_mean", "dice_std")]
    head = ["method", "Dice mean ± std", *[f"Dice {g[5:]}" for g in groups], "HD95 (mm)", "folding %",
            "std log\\|J\\|", "time / pair (s, median)", "peak memory (MiB)", f"p vs best ({summary.attrs['best']})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in summary.iterrows():
        p = r["p_vs_best"]
        cells = [str(method), f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}", *[f"{r[g]:.3f}" for g in groups],
                 f"{r['hd95_mm']:.2f}", f"{r['folding_pct']:.3f}", f"{r['std_logjac']:.3f}",
                 format_number(r["seconds"], 3), format_number(r["peak_mib"], 0),
                 "—" if p != p else ("<0.001" if p < 0.001 else f"{p:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(summary: pd.DataFrame, path: Path) -> Path:
    """Two panels: Dice against time per pair (log scale), Dice against folding %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, label in ((axes[0], "seconds", "time per pair (s, median; log)"),
                              (axes[1], "folding_pct", "folding (% voxels with det J ≤ 0)")):
        for method, r in summary.iterrows():
            x = max(float(r[column]), 1e-4) if column == "seconds" else float(r[column])
            ax.errorbar(x, r["dice_mean"], yerr=r["dice_std"], fmt="o", capsize=3)
            ax.annotate(str(method), (x, r["dice_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("Dice (mean ± std over pairs)")
        if column == "seconds":
            ax.set_xscale("log")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def machine_description(device: torch.device | str) -> str:
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else f"CPU, {threads} torch threads"
    return f"{platform.machine()} {name}; torch {torch.__version__}, Python {platform.python_version()}"
