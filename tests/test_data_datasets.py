"""Prepared datasets: splits by subject, caching, users' folders and datalists, pair sampling."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepsim.data.datasets import load_datalist, prepare_embedded_brains, prepare_user_dataset
from deepsim.data.pairs import PairDataset, SubjectImages, _toy_labels, make_toy_dataset
from deepsim.errors import DatasetError


def _write_subjects(folder, n=5, layout="flat"):
    rng = np.random.default_rng(1)
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    for i in range(n):
        labels = _toy_labels((24, 26, 22), rng)
        image = (labels * 0.1 + 0.3 * (labels > 0) + 0.01 * rng.standard_normal(labels.shape)).astype(np.float32)
        if layout == "flat":
            paths = folder / f"s{i}_image.nii.gz", folder / f"s{i}_label.nii.gz"
        else:
            (folder / "images").mkdir(exist_ok=True)
            (folder / "labels").mkdir(exist_ok=True)
            paths = folder / "images" / f"s{i}.nii.gz", folder / "labels" / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(paths[0]))
        nib.save(nib.Nifti1Image(labels, affine), str(paths[1]))


def _subjects(datalist, split):
    return {it["subject"] for it in datalist[split]}


@pytest.mark.parametrize("layout", ["flat", "subfolders"])
def test_user_folder_is_prepared_and_split_by_subject(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    _write_subjects(src, layout=layout)
    path = prepare_user_dataset(src, tmp_path / "out", spacing_mm=2.0, roi_size=(32, 32, 32), progress=False)
    d = load_datalist(path)
    assert len(d["test"]) == 1 and len(d["training"]) == 4
    assert not _subjects(d, "training") & _subjects(d, "test")
    assert d["label_values"] == list(range(7)) and d["roi_size"] == [32, 32, 32]
    img = nib.load(d["training"][0]["image"])
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.float32 and (np.diag(img.affine)[:3] > 0).all()
    assert nib.load(d["training"][0]["label"]).get_data_dtype() == np.int16


def test_user_datalist_is_prepared_and_escaping_paths_are_rejected(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_subjects(src, n=4)
    items = [{"image": f"s{i}_image.nii.gz", "label": f"s{i}_label.nii.gz"} for i in range(4)]
    (src / "list.json").write_text(json.dumps({"training": items[:3], "test": items[3:]}))
    d = load_datalist(prepare_user_dataset(src / "list.json", tmp_path / "out", roi_size=(32, 32, 32), progress=False))
    assert [it["subject"] for it in d["test"]] == ["s3_image"] and len(d["training"]) == 3
    (src / "evil.json").write_text(json.dumps({"training": [{"image": "../x_image.nii.gz", "label": "s0_label.nii.gz"}]}))
    with pytest.raises(DatasetError, match="escapes"):
        prepare_user_dataset(src / "evil.json", tmp_path / "out2", roi_size=(32, 32, 32), progress=False)


def test_load_datalist_rejects_missing_keys_in_one_line(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="lacks the keys"):
        load_datalist(tmp_path / "datalist.json")


def test_pair_dataset_never_pairs_a_subject_with_itself_and_yields_roi_shapes(tmp_path):
    path = make_toy_dataset(tmp_path / "toy", shape=(24, 24, 24), n_subjects=5)
    subjects = {it["id"]: it["subject"] for s in ("training", "test") for it in load_datalist(path)[s]}
    for split, num_pairs in (("training", None), ("training", 30), ("test", None), ("validation", None)):
        ds = PairDataset(path, split, num_pairs=num_pairs, seed=3)
        for i in range(len(ds)):
            item = ds[i]
            assert subjects.get(item["fixed_id"], item["fixed_id"].split("_")[0]) != subjects.get(
                item["moving_id"], item["moving_id"].split("_")[0]
            )
            assert item["fixed"].shape == item["moving_label"].shape == (1, 24, 24, 24)
            assert item["fixed"].dtype == torch.float32 and item["fixed_label"].dtype == torch.int64
    ds = PairDataset(path, "training", num_pairs=10, seed=3)
    assert [ds.pair_indices(i) for i in range(10)] == [PairDataset(path, "training", 10, 3).pair_indices(i) for i in range(10)]
    batch = next(iter(DataLoader(ds, batch_size=1)))
    assert batch["fixed"].shape == (1, 1, 24, 24, 24) and batch["pair_id"][0].count("__") == 1
    assert SubjectImages(path, "test")[0]["image"].affine.shape == (4, 4)


@pytest.mark.slow
def test_embedded_preparation_splits_by_donor_and_caches(tmp_path):
    path = prepare_embedded_brains(tmp_path / "emb", progress=False)
    d = load_datalist(path)
    assert not _subjects(d, "training") & _subjects(d, "test")
    assert (len(d["training"]), len(d["validation"]), len(d["test"])) == (27, 3, 6)
    assert len(d["label_values"]) == 83 and d["label_names"]["0"] == "background"
    assert nib.load(d["test"][0]["image"]).shape == (80, 96, 80)
    stamp = path.stat().st_mtime_ns
    assert prepare_embedded_brains(tmp_path / "emb", progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    pairs = PairDataset(path, "test")
    assert len(pairs) == 24 and pairs[0]["fixed"].shape == (1, 80, 96, 80)


def test_cached_second_embedded_call_is_fast_and_returns_the_same_path(tmp_path):
    kwargs = dict(spacing_mm=4.0, roi_size=(48, 48, 48), train_donors=("9861",), test_donors=("10021",),
                  augment_copies=1, test_variants=1, progress=False, num_workers=0)  # fmt: skip
    path = prepare_embedded_brains(tmp_path / "emb", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # no temporary folders left behind
    stamp = path.stat().st_mtime_ns
    assert prepare_embedded_brains(tmp_path / "emb", **kwargs) == path
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    d = load_datalist(path)
    assert _subjects(d, "training") == {"9861"} and _subjects(d, "test") == {"10021"}
