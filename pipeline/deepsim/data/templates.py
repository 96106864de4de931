"""The template a study is registered to, and its atlas (a label map on the template's grid).

The default ships in a PyPI wheel, nothing is downloaded: the MNI ICBM152 2009a nonlinear symmetric T1 template
(TemplateFlow's ``MNI152NLin2009aSym``; 1 mm, 197×233×189, skull-stripped, uint8) with its grey- and white-matter
probability maps, as the ``nilearn`` package ships them in ``nilearn/datasets/data/`` (located with
``importlib.util.find_spec``; nilearn itself, whose import takes seconds, is never imported). The template has no
parcellation, so its default atlas is the three tissue classes, CSF 1, GM 2, WM 3: inside the brain (T1 > 0) each
voxel gets the class of highest probability, CSF's being ``1 − p_GM − p_WM``. Licences: docs/cohort.md.

``name:res-N`` (e.g. ``MNI152NLin2009aSym:res-2``) resamples the template to N mm (linear for the T1 and the
probabilities, then the tissue classes), for quicker runs. A user's template is any 3D NIfTI T1 image, with an
optional atlas on its grid; the atlas's names come from a BIDS ``dseg.tsv`` beside it (same stem), else
``label-<n>``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepsim.data.bids import TISSUE_LABELS, read_label_table
from deepsim.errors import ConfigError, DatasetError

__all__ = ["Template", "load_template", "DEFAULT_TEMPLATE", "mni152_files"]

DEFAULT_TEMPLATE = "MNI152NLin2009aSym"
_MNI_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
_RES = re.compile(r"^(?P<name>[^:]+):res-(?P<mm>[0-9]+(\.[0-9]+)?)$")


@dataclass
class Template:
    """``name``: the BIDS ``space-`` label; ``t1w`` (*S) float32 and ``affine`` (4×4 voxel -> RAS, mm);
    ``atlas`` (*S) integer labels or None, named ``atlas_name`` (the ``desc-`` of the dseg files) with
    ``atlas_labels`` {value: name}; ``sources``: what it was made from (for the derivatives' description)."""

    name: str
    t1w: np.ndarray
    affine: np.ndarray
    atlas: np.ndarray | None
    atlas_name: str | None
    atlas_labels: dict[int, str]
    sources: dict[str, str]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.t1w.shape)


def mni152_files() -> dict[str, Path]:
    """Paths of nilearn's MNI152 2009a T1, GM and WM files (``t1``, ``gm``, ``wm``); ConfigError if missing."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default template {DEFAULT_TEMPLATE} ships with the PyPI package nilearn (data files "
                          "only): pip install nilearn; or pass --template PATH")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    files = {kind: folder / name for kind, name in _MNI_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"nilearn is installed but lacks {', '.join(missing)}; reinstall it (pip install nilearn)")
    return files


def _resample(array: np.ndarray, affine: np.ndarray, spacing_mm: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """``array`` on a grid of ``spacing_mm`` voxels over the same field of view (same axes), spline ``order``."""
    from scipy import ndimage as ndi

    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    factor = spacing_mm / zooms
    shape = tuple(int(np.floor((n - 1) / f)) + 1 for n, f in zip(array.shape, factor))
    out = ndi.affine_transform(array.astype(np.float32), np.diag(factor), output_shape=shape, order=order,
                               mode="nearest")
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * factor
    return out, new


def _tissue_atlas(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """CSF 1, GM 2, WM 3 where ``t1`` > 0, by the highest of the probabilities (CSF: 1 − GM − WM)."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    classes = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    classes[t1 <= 0] = 0
    return classes


def _default(resolution: float | None) -> Template:
    import nibabel as nib

    files = mni152_files()
    images = {kind: nib.load(str(path)) for kind, path in files.items()}
    affine = np.asarray(images["t1"].affine, dtype=np.float64)
    arrays = {kind: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for kind, img in images.items()}
    name = DEFAULT_TEMPLATE
    if resolution is not None and resolution != 1.0:
        out_affine = affine
        for kind in arrays:
            arrays[kind], out_affine = _resample(arrays[kind], affine, resolution, order=1)
        affine = out_affine
        name = f"{DEFAULT_TEMPLATE}res{resolution:g}".replace(".", "p")
    atlas = _tissue_atlas(arrays["t1"], arrays["gm"], arrays["wm"])
    sources = {kind: f"nilearn:{path.name}" for kind, path in files.items()}
    return Template(name, arrays["t1"], affine, atlas, "tissue", dict(TISSUE_LABELS), sources)


def _entity(path: Path, key: str) -> str | None:
    match = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)", path.name)
    return match.group(1) if match else None


def _user(path: Path, atlas: Path | None) -> Template:
    from deepsim.io import read_image

    t1, affine, _ = read_image(path)
    if t1.ndim != 3:
        raise DatasetError(f"{path}: the template has {t1.ndim} dimensions; expected a 3D image")
    name = _entity(path, "tpl") or re.sub(r"[^A-Za-z0-9]", "", path.name.split(".")[0]) or "template"
    labels, atlas_name, names = None, None, {}
    if atlas is not None:
        labels, atlas_affine, _ = read_image(atlas)
        if labels.shape != t1.shape or not np.allclose(atlas_affine, affine, atol=1e-3):
            raise DatasetError(f"{atlas}: the atlas grid {labels.shape} does not match the template {path} "
                               f"{t1.shape} (shape and affine must agree)")
        if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(labels, np.round(labels)):
            raise DatasetError(f"{atlas}: the atlas has non-integer values; expected a label map")
        labels = labels.astype(np.int32)
        atlas_name = _entity(atlas, "desc") or _entity(atlas, "atlas") or "atlas"
        table = atlas.with_name(atlas.name.split(".")[0] + ".tsv")
        names = read_label_table(table) if table.is_file() else {}
        names = {int(v): names.get(int(v), f"label-{int(v)}") for v in np.unique(labels) if v != 0}
    sources = {"t1": str(path.resolve())} | ({"atlas": str(atlas.resolve())} if atlas is not None else {})
    return Template(name, t1.astype(np.float32), affine, labels, atlas_name, names, sources)


def load_template(spec: str | Path | None = None, atlas: str | Path | None = None) -> Template:
    """The template ``spec`` names: None or ``MNI152NLin2009aSym[:res-N]`` (the default, tissue atlas; ``atlas``
    replaces it if given on the same grid), or a NIfTI path (with ``atlas``, an optional label map on its grid)."""
    text = DEFAULT_TEMPLATE if spec is None else str(spec)
    match = _RES.match(text)
    name, resolution = (match.group("name"), float(match.group("mm"))) if match else (text, None)
    if name == DEFAULT_TEMPLATE:
        template = _default(resolution)
        if atlas is not None:
            user = _user(mni152_files()["t1"], Path(atlas)) if resolution in (None, 1.0) else None
            if user is None:
                raise ConfigError("--atlas with a resampled default template: give the template at res-1 or your own "
                                  "template image with an atlas on its grid")
            template.atlas, template.atlas_name, template.atlas_labels = user.atlas, user.atlas_name, user.atlas_labels
            template.sources["atlas"] = user.sources["atlas"]
        return template
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--template {text}: neither {DEFAULT_TEMPLATE}[:res-N] nor an existing NIfTI file")
    return _user(path, Path(atlas).expanduser() if atlas is not None else None)
