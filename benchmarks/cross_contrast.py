"""Registration across MRI contrasts: every test-time loss, ANTs and FireANTs with mutual information, the product.

The held-out donors 10021, 15496 and 15697 (real anatomy, DK labels) rendered in the fixed T1-, T2- and PD-like
contrasts of :mod:`deepsim.data.contrasts`, registered across donors and contrasts (T1↔T2, T1↔PD, T2↔PD; T1↔T1 as
the same-contrast check), and nilearn's ICBM152 T1 against a T2-like rendering of its own tissue maps pushed through
a known smooth deformation (endpoint error). Four steps, as in ``compare_1mm_gpu.py``, because the GPU machine
holds neither ANTs nor SimpleITK and a call carries at most 64 MiB:

1. ``prepare`` (CPU): the renders at ``--spacing`` (1 mm for the GPU; 2 mm for a CPU run), centre-aligned,
   cropped to the 1 mm (or 2 mm) ROI, stored as uint8 with slope 1/255 on one grid (affine diag(spacing), so world
   and voxel alignment agree); explicit pairs in ``data/datalist.json`` (per contrast pair, every ordered pair of
   donors: the first contrast fixed, the second moving); ``models/`` copies the feature nets (and any
   ``registration_<loss>.pt``) of ``--models`` (default: the brain bundle's); ``icbm/`` the ICBM152 pair.
   1 mm: about 20 MB.
2. ``run`` (GPU or CPU): each method on every pair across contrasts and on the ICBM pair; the same-contrast
   pairs for :data:`SAME_CONTRAST_METHODS` and rows with a network; then the noise pass (Gaussian noise of σ
   ``--noise`` on both images, the same for every method) on the T1↔T2 pairs for the losses of
   :data:`NOISE_LOSSES`. Results are written after every method, so a run stopped by a time limit keeps what it
   finished.
3. ``ants`` (CPU): ANTs SyN with Mattes MI on the same pairs (not on the GPU machine).
4. ``merge``: the tables of ``benchmarks/results/cross_contrast*.md``.

Methods (``--methods``): ``identity``; ``affine`` (our affine stage, metric ``--affine-metric``, MI by default);
``affine+io-<loss>`` (the affine, then instance optimisation from the identity with ``<loss>``: ncc, mse, nmi,
mind, deepsim-ae, deepsim-seg); ``affine+<net>+io-<loss>`` (with a network ``models/registration_<net>.pt``
between them); ``fireants-mi`` and ``ants-syn-mi`` (:mod:`deepsim.peers` with mutual information); ``register``
(``deepsim register`` as a user runs it, every option left at its default: the product's own choice of path).

    python benchmarks/cross_contrast.py prepare --out .gpudata/xc1mm --spacing 1 [--models DIR]
    python benchmarks/cross_contrast.py run --run-dir .gpudata/xc1mm --out /tmp/xc --device cuda   # GPU
    python benchmarks/cross_contrast.py ants --run-dir .gpudata/xc1mm --out /tmp/xcants             # CPU
    python benchmarks/cross_contrast.py merge --results /tmp/xc /tmp/xcants --table benchmarks/results/cross_contrast.md
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from itertools import permutations
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DONORS = ("10021", "15496", "15697")
#: (fixed contrast, moving contrast); the last is the same-contrast check
CONTRAST_PAIRS = (("t1", "t2"), ("t1", "pd"), ("t2", "pd"), ("t1", "t1"))
LOSSES = ("ncc", "mse", "nmi", "mind", "deepsim-ae", "deepsim-seg")
OUR_METHODS = ("identity", "affine", *[f"affine+io-{loss}" for loss in LOSSES])
DEFAULT_METHODS = (*OUR_METHODS, "fireants-mi", "register")
NOISE_COMBO = "t1-t2"
#: the methods also run on the same-contrast pairs (the "within 0.01 of NCC" check; the rest skip them, to keep the
#: 1 mm run within 8 minutes of one GPU), and the loss rows of the noise pass
SAME_CONTRAST_METHODS = ("identity", "affine", "affine+io-ncc", "affine+io-deepsim-ae", "affine+io-deepsim-seg",
                         "register")
NOISE_LOSSES = ("ncc", "nmi", "mind", "deepsim-ae", "deepsim-seg")
ICBM_RMS_MM, ICBM_SEED = 4.0, 0


def _combo(fixed_contrast: str, moving_contrast: str) -> str:
    return f"{fixed_contrast}-{moving_contrast}"


def _save_uint8(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """[0, 1] intensities as uint8 with slope 1/255: every method reads the same values, and the folder stays small."""
    import nibabel as nib

    values = np.clip(np.round(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    image = nib.Nifti1Image(values, affine)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    nib.save(image, path)


def _prepare_donors(out: Path, spacing: float, seed: int) -> dict:
    """Render every donor in every contrast onto the ROI; returns the datalist."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor

    from deepsim.data.contrasts import CONTRASTS, render_contrast
    from deepsim.data.datasets import _seed
    from deepsim.data.embedded import dk_label_names, embedded_label_paths
    from deepsim.data.synthesis import brain_mask
    from deepsim.data.transforms import Chain, default_roi_size, grid_transforms, loading_transforms

    grid_affine = np.diag([spacing] * 3 + [1.0])
    grid = Chain(grid_transforms(spacing, default_roi_size(spacing)))
    items, values = [], {0}
    for donor in DONORS:
        label = Chain(loading_transforms(None))({"label": str(embedded_label_paths()[donor])})["label"]
        label_spacing = np.linalg.norm(label.affine.numpy()[:3, :3], axis=0)
        masks = brain_mask(label[0].numpy(), label_spacing)
        for contrast in CONTRASTS:
            image = render_contrast(label[0].numpy(), label_spacing, contrast, _seed(seed, donor, contrast), masks)
            data = grid({"image": MetaTensor(torch.from_numpy(image)[None], affine=label.affine.clone()),
                         "label": label.clone()})
            _save_uint8(out / "data" / f"{donor}_{contrast}_image.nii.gz", data["image"][0].numpy(), grid_affine)
            items.append({"image": f"{donor}_{contrast}_image.nii.gz", "label": f"{donor}_label.nii.gz",
                          "subject": donor, "id": f"{donor}_{contrast}", "contrast": contrast})
        labels = data["label"][0].numpy().astype(np.int16)
        nib.save(nib.Nifti1Image(labels, grid_affine), out / "data" / f"{donor}_label.nii.gz")
        values |= {int(v) for v in np.unique(labels)}
    names = dk_label_names()
    pairs = [[f"{a}_{fc}", f"{b}_{mc}"] for fc, mc in CONTRAST_PAIRS for a, b in permutations(DONORS, 2)]
    return {"training": [], "validation": [], "test": items, "pairs": {"test": pairs},
            "label_values": sorted(values), "label_names": {str(v): names.get(v, str(v)) for v in sorted(values)},
            "spacing_mm": float(spacing), "roi_size": list(default_roi_size(spacing)), "seed": int(seed),
            "kind": "cross-contrast"}


def _prepare_icbm(out: Path, spacing: float) -> None:
    """ICBM152 T1 (fixed) and a T2-like rendering of its tissue maps through a known field (moving)."""
    import importlib.util

    import nibabel as nib

    sys.path.insert(0, str(HERE))
    from real_t1_check import _known_deformation, _moving, _resample

    from deepsim.data.contrasts import render_tissue_maps

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise SystemExit("nilearn is not installed: pip install nilearn (only its data files are read)")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    read = lambda kind: np.asarray(nib.load(folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")  # noqa: E731
                                   .dataobj, dtype=np.float32)
    affine = nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").affine
    t1, grey, white = read("t1"), read("gm") / 255.0, read("wm") / 255.0
    from scipy import ndimage as ndi

    mask = ndi.binary_fill_holes(ndi.binary_closing(grey + white > 0.3, iterations=2))  # as real_t1_check.py
    fixed = t1 * mask
    fixed /= np.percentile(fixed[mask], 99.5)
    t2 = render_tissue_maps(grey, white, mask, np.linalg.norm(affine[:3, :3], axis=0), "t2", ICBM_SEED,
                            bias_strength=0.0, noise_fraction=0.0)
    fixed, grid = _resample(fixed, affine, spacing, 1)
    t2 = _resample(t2, affine, spacing, 1)[0]
    mask = _resample(mask.astype(np.float32), affine, spacing, 1)[0] > 0.5
    field = _known_deformation(mask, spacing, ICBM_RMS_MM, ICBM_SEED)
    moving = _moving(t2 / 0.8, field, ICBM_SEED)  # brightest tissue (CSF) at 1, then bias and noise
    grid_affine = np.diag([spacing] * 3 + [1.0])
    (out / "icbm").mkdir(parents=True, exist_ok=True)
    _save_uint8(out / "icbm" / "fixed_t1.nii.gz", fixed, grid_affine)
    _save_uint8(out / "icbm" / "moving_t2.nii.gz", moving, grid_affine)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), grid_affine), out / "icbm" / "mask.nii.gz")
    (out / "icbm" / "field.json").write_text(json.dumps({
        "rms_mm": ICBM_RMS_MM, "seed": ICBM_SEED, "spacing_mm": spacing, "abs_sum_vox": float(np.abs(field).sum()),
        "note": "the true field is benchmarks/real_t1_check.py's _known_deformation(mask, spacing, rms_mm, seed)"}))


def prepare(out: Path, spacing: float, models: Path | None, seed: int = 0) -> None:
    from deepsim.resources import bundle_dir

    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    datalist = _prepare_donors(out, spacing, seed)
    (out / "data" / "datalist.json").write_text(json.dumps(datalist, indent=1))
    models = models or bundle_dir("brain_mri") / "models"
    for path in [*models.glob("feature_*.pt"), *models.glob("registration_*.pt")]:
        if not path.name.endswith(".state.pt"):
            shutil.copy(path, out / "models" / path.name)
    _prepare_icbm(out, spacing)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"{out}: {len(datalist['test'])} images, {len(datalist['pairs']['test'])} pairs, ICBM pair; {size:.1f} MB")


# --------------------------------------------------------------------------------------------------- registering


def _method(method: str, run_dir: Path, device, spacing: float, affine_metric: str):
    """(fn(fixed path, moving path, fixed array, moving array) -> ddf (ndim, *S) voxels, parameters)."""
    import torch

    from deepsim.peers import AntsSyN, FireANTs
    from deepsim.registration.pipeline import method_registrar, registrar_params

    if method == "identity":
        return (lambda fp, mp, f, m: torch.zeros(3, *f.shape)), {}
    if method in ("fireants-mi", "ants-syn-mi"):
        tool = (FireANTs(loss_type="mi", device=str(device), name=method) if method == "fireants-mi"
                else AntsSyN(syn_metric="mattes", syn_sampling=32, name=method))
        return (lambda fp, mp, f, m: torch.as_tensor(tool(f, m, spacing))), tool.params()
    if method == "register":
        return _product(device), {"command": "deepsim register --fixed F --moving M (no other option)"}
    registrar = method_registrar(method, run_dir / "models", device, affine_metric=affine_metric)

    def run(fp, mp, f, m):
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return registrar.on_grid(as_t(f), as_t(m), spacing).voxel_ddf()[0]

    return run, registrar_params(registrar)


#: what the last ``register`` call reported beyond its field (detected contrast, warnings), for its results row
_PRODUCT_REPORT: dict = {}


def _product(device):
    """``deepsim register`` on the pair's files with every option at its default; its whole field in voxels."""
    import torch

    from deepsim.io import load_displacement
    from deepsim.registration.inference import register_files
    from deepsim.spatial import ddf_world_to_voxel

    def run(fixed_path, moving_path, f, m):
        with tempfile.TemporaryDirectory() as folder:
            written = register_files(fixed_path, moving_path, Path(folder) / "reg", device=device, progress=False)
            ddf_mm, affine = load_displacement(written["ddf_mm"])
            report = json.loads(written["report"].read_text())
        _PRODUCT_REPORT.clear()
        _PRODUCT_REPORT.update(contrast=report.get("contrast", {}).get("used", "same (no contrast option)"),
                               warnings=len(report.get("warnings", [])))
        return ddf_world_to_voxel(torch.as_tensor(ddf_mm)[None], torch.as_tensor(affine))[0]

    return run


@functools.cache
def _pair_dataset(run_dir: Path):
    """The prepared pairs (read once), each image's contrast and file by id."""
    from deepsim.data.pairs import PairDataset

    datalist = json.loads((run_dir / "data" / "datalist.json").read_text())
    contrast_of = {item["id"]: item["contrast"] for item in datalist["test"]}
    path_of = {item["id"]: run_dir / "data" / item["image"] for item in datalist["test"]}
    return PairDataset(run_dir / "data" / "datalist.json", "test"), contrast_of, path_of


def _pairs_rows(run_dir: Path, method: str, fn, device, noise: float, combos: set[str] | None, max_pairs) -> list:
    from deepsim.evaluation.compare import score_pair

    pairs, contrast_of, path_of = _pair_dataset(run_dir)
    rows = []
    for i in range(len(pairs)):
        fixed_id, moving_id = (pairs.subjects.items[k]["id"] for k in pairs.pair_indices(i))
        combo = _combo(contrast_of[fixed_id], contrast_of[moving_id])
        if combos is not None and combo not in combos:
            continue
        if max_pairs is not None and sum(r["combo"] == combo for r in rows) >= max_pairs:
            continue
        pair = pairs[i]
        metrics, _, _, seconds, peak = score_pair(
            pair, i, lambda f, m: fn(path_of[fixed_id], path_of[moving_id], f, m), device, noise)
        rows.append({"method": method, "pair_id": pair["pair_id"], "combo": combo, "noise_std": float(noise),
                     **metrics, "seconds": seconds, "peak_mib": peak, **(_PRODUCT_REPORT if method == "register"
                                                                         else {})})
    return rows


@functools.cache
def _icbm_pair(folder: Path):
    """(field.json, fixed, moving, brain mask, the true field (3, *S) in voxels), read and regenerated once."""
    import nibabel as nib

    sys.path.insert(0, str(HERE))
    from real_t1_check import _known_deformation

    info = json.loads((folder / "field.json").read_text())
    read = lambda name: np.asarray(nib.load(folder / name).dataobj, dtype=np.float32)  # noqa: E731
    fixed, moving, mask = read("fixed_t1.nii.gz"), read("moving_t2.nii.gz"), read("mask.nii.gz") > 0
    truth = _known_deformation(mask, info["spacing_mm"], info["rms_mm"], info["seed"])
    if not np.isclose(np.abs(truth).sum(), info["abs_sum_vox"], rtol=1e-5):
        raise SystemExit(f"{folder}: the regenerated known field differs from the prepared one")
    return info, fixed, moving, mask, truth


def _icbm_rows(run_dir: Path, method: str, fn, device) -> list:
    """Endpoint error (mm) of the method's field against the known one, in the ICBM brain mask."""
    import torch

    from deepsim.evaluation.compare import peak_memory
    from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian

    folder = run_dir / "icbm"
    info, fixed, moving, mask, truth = _icbm_pair(folder)
    ddf, seconds, peak = peak_memory(lambda: fn(folder / "fixed_t1.nii.gz", folder / "moving_t2.nii.gz", fixed,
                                                moving), device)
    ddf = torch.as_tensor(ddf, dtype=torch.float32).cpu()
    error = (np.linalg.norm(ddf.numpy() - truth, axis=0) * info["spacing_mm"])[mask]
    det = jacobian_determinant(ddf[None])[0]
    return [{"method": method, "pair_id": "icbm152_t1__t2like", "combo": "icbm-t1-t2", "noise_std": 0.0,
             "epe_mean_mm": float(error.mean()), "epe_p95_mm": float(np.percentile(error, 95)),
             "folding_pct": folding_percent(det, torch.as_tensor(mask)),
             "std_logjac": std_log_jacobian(det, torch.as_tensor(mask)), "seconds": seconds, "peak_mib": peak,
             **(_PRODUCT_REPORT if method == "register" else {})}]


def run(run_dir: Path, out: Path, methods: list[str], noise: float, device: str, max_pairs: int | None,
        affine_metric: str, icbm: bool, combos: list[str] | None = None) -> None:
    sys.path.insert(0, str(HERE))
    import pandas as pd
    import torch

    from sitk_standin import install

    standin = install()  # FireANTs reads arrays through it where SimpleITK is missing (the GPU machine)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    out.mkdir(parents=True, exist_ok=True)
    spacing = float(json.loads((run_dir / "data" / "datalist.json").read_text())["spacing_mm"])
    rows: list[dict] = []
    started = time.perf_counter()

    def save(new: list[dict]) -> None:
        rows.extend(new)
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)

    for method in methods:
        t0 = time.perf_counter()
        fn, params = _method(method, run_dir, device, spacing, affine_metric)
        if device.startswith("cuda"):  # untimed: CUDA start-up and cuDNN autotuning stay out of the timings
            _pairs_rows(run_dir, method, fn, device, 0.0, {"t1-t2"}, 1)
        chosen = set(combos) if combos else {_combo(*c) for c in CONTRAST_PAIRS}
        with_network = method.startswith("affine+") and not method.startswith("affine+io-") and "+io-" in method
        if method not in SAME_CONTRAST_METHODS and not with_network:
            chosen.discard("t1-t1")
        save(_pairs_rows(run_dir, method, fn, device, 0.0, chosen, max_pairs))
        if icbm:
            save(_icbm_rows(run_dir, method, fn, device))
        print(f"{method}: {time.perf_counter() - t0:.1f} s", flush=True)
    for method in [m for m in methods if m.split("+io-")[-1] in NOISE_LOSSES] if noise > 0 else []:
        t0 = time.perf_counter()
        fn, _ = _method(method, run_dir, device, spacing, affine_metric)
        save(_pairs_rows(run_dir, method, fn, device, noise, {NOISE_COMBO}, max_pairs))
        print(f"{method}, noise {noise:g}: {time.perf_counter() - t0:.1f} s", flush=True)
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    (out / "machine.json").write_text(json.dumps({
        "device": machine, "torch": torch.__version__, "python": sys.version.split()[0], "affine_metric": affine_metric,
        "total_s": time.perf_counter() - started,
        "fireants_arrays_through": "sitk_standin" if standin else "SimpleITK"}, indent=1))
    print(f"all: {time.perf_counter() - started:.1f} s on {machine}")


# --------------------------------------------------------------------------------------------------- the tables


def _better(results, method: str, baseline: str) -> str:
    from deepsim.evaluation.summary import paired_wilcoxon

    a = results.loc[results["method"] == method].set_index("pair_id")["dice_mean"]
    b = results.loc[results["method"] == baseline].set_index("pair_id")["dice_mean"]
    a, b = a.align(b, join="inner")
    p = paired_wilcoxon(results, method, baseline)
    return (f"{method} vs {baseline}: Dice {float((a - b).mean()):+.3f} over {len(a)} pairs (better on "
            f"{int((a > b).sum())}), Wilcoxon p = {p:.2g}")


def _dice_table(results, columns: list[str], common: bool = True) -> list[str]:
    """One row per method on the pairs every method has: Dice mean ± std over pairs, Dice per contrast pair,
    folding, std log|J|, time, paired Wilcoxon p against the best."""
    from deepsim.evaluation.summary import format_number, paired_wilcoxon, summarise

    if common:  # only the pairs every method has: means over one set of pairs
        counts = results.groupby("pair_id")["method"].nunique()
        results = results[results["pair_id"].isin(counts.index[counts == results["method"].nunique()])]
    summary = summarise(results).set_index("method")
    best = str(summary["dice_mean"].drop("identity", errors="ignore").idxmax())
    head = ["method", "pairs", "Dice mean ± std", *[f"Dice {c}" for c in columns], "folding %", "std log\\|J\\|",
            "time / pair (s, median)", f"p vs best ({best})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in summary.iterrows():
        own = results[results["method"] == method]
        per_combo = [format_number(own.loc[own["combo"] == c, "dice_mean"].mean()) for c in columns]
        p = float("nan") if method == best else paired_wilcoxon(results, method, best)
        cells = [method, str(int(r["n_pairs"])), f"{r['dice_mean']:.3f} ± {format_number(r['dice_std'])}", *per_combo,
                 format_number(r["folding_pct"]), format_number(r["std_logjac"]),
                 format_number(own["seconds"].median(), 2), "—" if p != p else ("<0.001" if p < 0.001 else f"{p:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def merge(folders: list[Path], table: Path, commands: list[str], title: str, notes: list[str],
          common: bool = True) -> None:
    import pandas as pd

    frames, machines = [], []
    for folder in folders:
        frames.append(pd.read_csv(folder / "results.csv"))
        if (folder / "machine.json").is_file():
            machines.append(f"{folder.name}: {json.loads((folder / 'machine.json').read_text())}")
    frame = pd.concat(frames, ignore_index=True)
    pairs = frame[frame["combo"] != "icbm-t1-t2"]
    clean, noisy = pairs[pairs["noise_std"] == 0], pairs[pairs["noise_std"] > 0]
    cross = clean[clean["combo"] != "t1-t1"]
    combos = [_combo(*c) for c in CONTRAST_PAIRS if c[0] != c[1] and _combo(*c) in set(cross["combo"])]
    lines = [f"# {title}", "", *notes, "", "Commands:", "", *[f"    {c}" for c in commands], "",
             *[f"Machine: {m}" for m in machines], ""]
    lines += ["## Across contrasts (T1↔T2, T1↔PD, T2↔PD)", "", *_dice_table(cross, combos, common), ""]
    methods = list(dict.fromkeys(cross["method"]))
    deepsim = [m for m in methods if "deepsim" in m]
    references = [m for m in methods if m.endswith(("io-mind", "io-nmi")) or m in ("ants-syn-mi", "fireants-mi")]
    if deepsim:
        best = max(deepsim, key=lambda m: cross.loc[cross["method"] == m, "dice_mean"].mean())
        lines += [f"- {_better(cross, best, ref)}" for ref in references] + [""]
    if "register" in set(cross["method"]):
        used = cross.loc[cross["method"] == "register"]
        lines += [f"- `register` (the product, no option): contrast used {used['contrast'].value_counts().to_dict()}, "
                  f"warnings on {int((used['warnings'] > 0).sum())} of {len(used)} pairs", ""]
    same = clean[clean["combo"] == "t1-t1"]
    if len(same):
        lines += ["## Same contrast (T1↔T1)", "", *_dice_table(same, ["t1-t1"], common), ""]
        ncc = same.loc[same["method"].str.endswith("io-ncc"), "dice_mean"].mean()
        lines += [f"- {m}: {same.loc[same['method'] == m, 'dice_mean'].mean() - ncc:+.3f} Dice against NCC"
                  for m in dict.fromkeys(same["method"]) if "deepsim" in m] + [""]
    if len(noisy):
        sigma = float(noisy["noise_std"].iloc[0])
        lines += [f"## Gaussian noise σ {sigma:g} on both images ({', '.join(sorted(set(noisy['combo'])))})", "",
                  "| method | Dice clean | Dice noisy | loss of Dice | folding % noisy | std log\\|J\\| noisy |",
                  "|---|---|---|---|---|---|"]
        for method in dict.fromkeys(noisy["method"]):
            n = noisy[noisy["method"] == method].set_index("pair_id")
            c = clean[clean["method"] == method].set_index("pair_id").loc[n.index]
            lines.append(f"| {method} | {c['dice_mean'].mean():.3f} | {n['dice_mean'].mean():.3f} | "
                         f"{(c['dice_mean'] - n['dice_mean']).mean():.3f} | {n['folding_pct'].mean():.3f} | "
                         f"{n['std_logjac'].mean():.3f} |")
        lines.append("")
    icbm = frame[frame["combo"] == "icbm-t1-t2"]
    if len(icbm):
        lines += ["## ICBM152: real T1 (fixed) ↔ T2-like rendering of its tissue maps through a known field", "",
                  "| method | EPE mean (mm) | EPE 95th pct (mm) | folding % | std log\\|J\\| | time (s) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.method} | {r.epe_mean_mm:.2f} | {r.epe_p95_mm:.2f} | {r.folding_pct:.3f} | "
                  f"{r.std_logjac:.3f} | {r.seconds:.1f} |" for r in icbm.itertuples()] + [""]
    table.write_text("\n".join(lines))
    print(table.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--spacing", type=float, default=1.0)
    p.add_argument("--models", type=Path, default=None,
                   help="folder with feature_{ae,seg}.pt (and optionally registration_<loss>.pt); default: the "
                   "brain bundle's models/")
    for name in ("run", "ants"):
        r = sub.add_parser(name)
        r.add_argument("--run-dir", type=Path, required=True)
        r.add_argument("--out", type=Path, required=True)
        r.add_argument("--max-pairs", type=int, default=None, help="at most N pairs per contrast pair")
        r.add_argument("--no-icbm", dest="icbm", action="store_false", help="leave out the ICBM152 pair")
        r.add_argument("--combos", nargs="+", default=None, metavar="FIXED-MOVING",
                       help="only these contrast pairs (t1-t2 t1-pd t2-pd t1-t1; default: all)")
        if name == "run":
            r.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
            r.add_argument("--noise", type=float, default=0.1)
            r.add_argument("--device", default="cuda")
            r.add_argument("--affine-metric", choices=["mi", "ncc"], default="mi")
    m = sub.add_parser("merge")
    m.add_argument("--results", type=Path, nargs="+", required=True, help="output folders of run / ants")
    m.add_argument("--table", type=Path, required=True)
    m.add_argument("--command", action="append", default=[])
    m.add_argument("--title", default="Registration across MRI contrasts")
    m.add_argument("--note", action="append", default=[])
    m.add_argument("--all-pairs", dest="common", action="store_false",
                   help="each method's mean over the pairs it ran (default: only the pairs every method ran)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.spacing, args.models)
    elif args.step == "run":
        run(args.run_dir, args.out, args.methods, args.noise, args.device, args.max_pairs, args.affine_metric,
            args.icbm, args.combos)
    elif args.step == "ants":
        run(args.run_dir, args.out, ["ants-syn-mi"], 0.0, "cpu", args.max_pairs, "mi", args.icbm, args.combos)
    else:
        merge(args.results, args.table, args.command, args.title, args.note, args.common)


if __name__ == "__main__":
    main()
