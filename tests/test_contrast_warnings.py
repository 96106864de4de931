"""A test set of deliberately mismatched pairs: ``deepsim register`` warns on every one, and on no good pair.

Real anatomy (two held-out donors at 3 mm, rendered in the T1/T2 contrasts of :mod:`deepsim.data.contrasts`), the
product's own path (:func:`deepsim.registration.inference.register_files`, contrast left at ``auto`` unless a case
says otherwise) with a small untrained network and shortened instance optimisation (ten registrations of 3 mm
images; 23 minutes on the 2 shared cores at a load of 15, not measured on an idle machine).
"""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from deepsim.data.contrasts import render_contrast
from deepsim.data.embedded import embedded_label_paths
from deepsim.data.synthesis import brain_mask
from deepsim.engine.checkpoints import save_checkpoint
from deepsim.registration.inference import register_files
from deepsim.registration.network import RegistrationNet

SPACING = 3.0
ITERATIONS = (20, 10, 0)


def _render(donor: str, contrast: str) -> tuple[np.ndarray, np.ndarray]:
    label = nib.load(embedded_label_paths()[donor])
    step = int(round(SPACING / float(np.linalg.norm(label.affine[:3, 0]))))
    values = np.asarray(label.dataobj)[::step, ::step, ::step]
    affine = label.affine @ np.diag([step, step, step, 1.0])
    image = render_contrast(values, np.linalg.norm(affine[:3, :3], axis=0), contrast, seed=int(donor) % 89)
    return image, affine


def _moved(affine: np.ndarray, degrees: float, shift) -> np.ndarray:
    t = np.deg2rad(degrees)
    move = np.eye(4)
    move[:3, :3] = [[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]
    move[:3, 3] = shift
    return move @ affine


def _cases() -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """name -> (contrast option, moving array, moving affine); the fixed image is donor 15496's T1."""
    t1, a1 = _render("10021", "t1")
    t2, a2 = _render("10021", "t2")
    pd, a3 = _render("10021", "pd")
    slab = a1.copy()
    slab[:3, 3] = a1[:3, :3] @ np.array([0.0, 0.0, 0.6 * t1.shape[2]]) + a1[:3, 3]
    rng = np.random.default_rng(0)
    unrelated = np.clip(ndi.gaussian_filter(rng.standard_normal(t1.shape), 2.0) * 6.0 + 0.5, 0, None)
    return {
        "good: one contrast": ("auto", t1, a1),
        "good: one contrast, placed 10 deg and 27 mm off": ("auto", t1, _moved(a1, 10.0, (15.0, -20.0, 10.0))),
        "good: T1 to T2": ("auto", t2, a2),
        "good: T1 to PD": ("auto", pd, a3),
        "good: T1 to T2, told different": ("different", t2, a2),
        "bad: wrong region (the top 40 % of the head)": ("auto", t1[:, :, int(0.6 * t1.shape[2]):], slab),
        "bad: flipped top to bottom (this LIP image's second voxel axis)": ("auto", t1[:, ::-1, :].copy(), a1),
        "bad: flipped front to back (its third voxel axis)": ("auto", t1[:, :, ::-1].copy(), a1),
        "bad: an unrelated image": ("auto", unrelated.astype(np.float32), a1),
        "bad: T2 declared the same contrast": ("same", t2, a2),
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("mismatch")
    kwargs = dict(spatial_dims=3, in_channels=1, channels=[4, 8, 8], half_res=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = RegistrationNet(**kwargs)
    model = save_checkpoint(folder / "registration_ncc.pt", net, "registration_net", kwargs,
                            meta={"regularization_weight": 0.01, "similarity": "ncc", "spacing_mm": SPACING})
    fixed_array, fixed_affine = _render("15496", "t1")
    fixed = folder / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(fixed_array, fixed_affine), fixed)
    out = {}
    for i, (name, (contrast, array, affine)) in enumerate(_cases().items()):
        moving = folder / f"moving_{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), moving)
        written = register_files(fixed, moving, folder / f"out_{i}", model=model, contrast=contrast,
                                 iterations=ITERATIONS, progress=False)
        out[name] = json.loads(written["report"].read_text())
        print(name, out[name]["contrast"]["relation"], out[name]["checks"], out[name]["warnings"], flush=True)
    return out


@pytest.mark.parametrize("name", list(_cases()))
def test_every_mismatched_pair_warns_and_no_good_pair_does(reports, name):
    report = reports[name]
    summary = {k: (r["contrast"]["used"], r["contrast"]["relation"], r["checks"], r["warnings"])
               for k, r in reports.items()}
    if name.startswith("good"):
        assert report["warnings"] == [], json.dumps(summary, indent=1)
    else:
        assert report["warnings"], json.dumps(summary, indent=1)


def test_the_contrast_path_follows_the_detection(reports):
    assert reports["good: one contrast"]["contrast"]["used"] == "same"
    assert reports["good: T1 to T2"]["contrast"]["used"] == "different"
    assert reports["good: T1 to T2"]["affine_metric"] == "mi"
    assert reports["good: T1 to T2"]["stages"] == ["affine", "instance_optimisation"]
    assert reports["good: one contrast"]["stages"] == ["affine", "network", "instance_optimisation"]
