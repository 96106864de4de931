"""Preprocessing chain: RAS reorientation, ROI, normalisation, one-line DatasetErrors for bad inputs."""

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.data.transforms import augmentation_transforms, preprocessing_transforms
from deepsim.errors import DatasetError


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _pair(tmp_path, shape=(30, 34, 28), affine=None, name="sub"):
    affine = np.diag([-1.5, -1.5, 1.5, 1.0]) if affine is None else affine  # LPS storage
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.int16)
    label[8:22, 9:25, 7:21] = 1
    label[12:16, 14:18, 10:14] = 2
    image = (label * 0.3 + 0.2 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    return {
        "image": _save(tmp_path / f"{name}_image.nii.gz", image, affine),
        "label": _save(tmp_path / f"{name}_label.nii.gz", label, affine),
    }


def test_preprocessing_puts_an_lps_input_into_ras_and_keeps_world_positions(tmp_path):
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    label = np.zeros((30, 34, 28), np.int16)
    label[8:22, 9:25, 7:21] = 1
    label[10, 12, 9] = 7  # marked voxel
    world = affine @ np.array([10, 12, 9, 1.0])
    image = (label > 0).astype(np.float32)
    item = {
        "image": _save(tmp_path / "a_image.nii.gz", image, affine),
        "label": _save(tmp_path / "a_label.nii.gz", label, affine),
    }
    out = preprocessing_transforms(spacing_mm=1.5, roi_size=(32, 32, 32))(item)
    assert out["image"].shape == (1, 32, 32, 32) and out["label"].dtype == torch.int32
    out_affine = out["label"].affine.numpy()
    assert (np.diag(out_affine)[:3] > 0).all()
    voxel = np.argwhere(out["label"][0].numpy() == 7)
    assert len(voxel) == 1
    np.testing.assert_allclose(out_affine @ np.append(voxel[0], 1.0), world, atol=1e-3)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0


def test_augmentation_keeps_label_values_integer_and_image_in_unit_range(tmp_path):
    out = preprocessing_transforms(spacing_mm=1.5, roi_size=(32, 32, 32))(_pair(tmp_path))
    aug = augmentation_transforms(seed=1)(out)
    again = augmentation_transforms(seed=1)(out)
    assert set(torch.unique(aug["label"]).tolist()) <= {0, 1, 2}
    assert aug["image"].min() >= 0 and aug["image"].max() <= 1 and torch.isfinite(aug["image"]).all()
    torch.testing.assert_close(aug["image"], again["image"])
    assert not torch.equal(aug["label"], out["label"])


@pytest.mark.parametrize("problem", ["missing", "unreadable", "4d", "2d", "grid_shape", "grid_affine", "float_label", "nan"])
def test_bad_inputs_raise_a_dataset_error_naming_the_file(tmp_path, problem):
    item = _pair(tmp_path)
    bad = item["image"]
    if problem == "missing":
        bad = item["label"] = str(tmp_path / "nowhere_label.nii.gz")
    elif problem == "unreadable":
        (tmp_path / "broken_image.nii.gz").write_bytes(b"not a nifti")
        bad = item["image"] = str(tmp_path / "broken_image.nii.gz")
    elif problem == "4d":
        bad = item["image"] = _save(tmp_path / "t_image.nii.gz", np.zeros((30, 34, 28, 2), np.float32), np.eye(4))
    elif problem == "2d":
        bad = item["label"] = _save(tmp_path / "s_label.nii.gz", np.zeros((30, 34), np.int16), np.eye(4))
    elif problem == "grid_shape":
        bad = item["label"] = _save(tmp_path / "g_label.nii.gz", np.zeros((30, 34, 27), np.int16), np.diag([-1.5, -1.5, 1.5, 1]))
    elif problem == "grid_affine":
        bad = item["label"] = _save(tmp_path / "h_label.nii.gz", np.zeros((30, 34, 28), np.int16), np.diag([-1.5, -1.5, 1.6, 1]))
    elif problem == "float_label":
        lab = np.zeros((30, 34, 28), np.float32)
        lab[5:9, 5:9, 5:9] = 1.5
        bad = item["label"] = _save(tmp_path / "f_label.nii.gz", lab, np.diag([-1.5, -1.5, 1.5, 1]))
    elif problem == "nan":
        img = np.ones((30, 34, 28), np.float32)
        img[3, 3, 3] = np.nan
        bad = item["image"] = _save(tmp_path / "n_image.nii.gz", img, np.diag([-1.5, -1.5, 1.5, 1]))
    with pytest.raises(DatasetError) as info:
        preprocessing_transforms(spacing_mm=1.5, roi_size=(32, 32, 32))(item)
    message = str(info.value)
    assert "\n" not in message and bad.split("/")[-1] in message
