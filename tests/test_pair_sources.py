"""``pairs: fixed | synthetic``: the training batches of a stage, from the prepared datalist or from a label bank
(deepsim.data.pair_sources), on the toy dataset and a tiny 2D datalist, and through the bundles' configs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepsim.data.datasets import load_datalist
from deepsim.data.label_bank import CSF, WHITE_MATTER, LabelBank
from deepsim.data.label_bank_build import with_tissue_classes
from deepsim.data.pair_sources import (
    RankStride,
    bank_from_datalist,
    training_bank,
    training_images,
    training_label_values,
    training_pairs,
)
from deepsim.data.pairs import PairDataset, make_toy_dataset
from deepsim.data.synthesis import brain_mask
from deepsim.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "data")


def _write_datalist(folder: Path, maps: list[np.ndarray], names: dict[str, str], spacing: float = 1.0) -> Path:
    """A prepared-layout datalist of the given label maps (2D or 3D): all but the last two train, those two test."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing] * 3 + [1.0])
    content: dict = {"training": [], "validation": [], "test": []}
    for i, labels in enumerate(maps):
        split = "test" if i >= len(maps) - 2 else "training"
        for kind, array in (("image", labels.astype(np.float32) / max(1, labels.max())), ("label", labels)):
            nib.save(nib.Nifti1Image(array.astype(np.float32 if kind == "image" else np.int16), affine),
                     folder / f"s{i}_{kind}.nii.gz")
        content[split].append({"image": f"s{i}_image.nii.gz", "label": f"s{i}_label.nii.gz", "subject": f"s{i}",
                               "id": f"s{i}"})
    values = sorted({int(v) for m in maps for v in np.unique(m)} | {0})
    content.update(label_values=values, label_names=names, spacing_mm=spacing, roi_size=list(maps[0].shape))
    (folder / "datalist.json").write_text(json.dumps(content))
    return folder / "datalist.json"


def _squares(shape, count: int) -> list[np.ndarray]:
    """``count`` maps with a label-1 square (or cube) and a label-2 one inside it, shifted a voxel per map."""
    maps = []
    for i in range(count):
        m = np.zeros(shape, dtype=np.int16)
        m[tuple(slice(4 + i, n - 4 + i) for n in shape)] = 1
        m[tuple(slice(8 + i, n - 8 + i) for n in shape)] = 2
        maps.append(m)
    return maps


def test_a_datalist_bank_holds_each_original_training_map_once_with_the_tissue_classes_synthesis_paints(toy):
    datalist = load_datalist(toy)
    bank = bank_from_datalist(toy)
    # the toy's two contrast variants of a subject share one label map: one map per training subject
    assert len(bank) == len({it["subject"] for it in datalist["training"]}) == 2
    assert bank.class_values == (*range(7), WHITE_MATTER, CSF) and bank.class_names[-2:] == ("white matter", "CSF")
    first = datalist["training"][0]
    labels = np.asarray(nib.load(first["label"]).dataobj).astype(np.int64)
    expected = with_tissue_classes(labels, brain_mask(labels, (2.0, 2.0, 2.0)))
    as_values = np.asarray(bank.class_values)[bank.maps[0].numpy()]
    assert np.array_equal(as_values, expected) and (expected == WHITE_MATTER).sum() > 100  # the interior is WM
    assert np.allclose(bank.affine, nib.load(first["label"]).affine)


def test_labels_that_name_white_matter_and_2d_maps_get_no_tissue_classes(tmp_path):
    named = _write_datalist(tmp_path / "wm", _squares((24, 24, 24), 4), {"1": "Left-Cerebral-White-Matter"})
    assert bank_from_datalist(named).class_values == (0, 1, 2)
    flat = _write_datalist(tmp_path / "flat", _squares((24, 24), 5), {})
    bank = bank_from_datalist(flat)
    assert bank.class_values == (0, 1, 2) and bank.shape == (24, 24) and len(bank) == 3  # 5 maps, 2 of them test
    batch = next(iter(training_pairs("synthetic", flat, bank, num_pairs=1, seed=0)))
    assert batch["moving"].shape == (1, 1, 24, 24) and int(batch["fixed_label"].max()) <= 2


def test_a_tissue_value_the_dataset_uses_moves_the_added_classes_after_its_largest_value(tmp_path):
    maps = _squares((24, 24, 24), 4)
    maps[0][12, 12, 12] = WHITE_MATTER  # a dataset whose own labels use the value 84
    bank = bank_from_datalist(_write_datalist(tmp_path / "d", maps, {}))
    assert bank.class_values == (0, 1, 2, WHITE_MATTER, WHITE_MATTER + 1, WHITE_MATTER + 2)
    assert bank.class_names[-2:] == ("white matter", "CSF")


def test_fixed_pairs_are_the_pair_dataset_in_order(toy):
    loader = training_pairs("fixed", toy, num_pairs=3, seed=4, labels=True)
    reference = PairDataset(toy, "training", num_pairs=3, seed=4)
    batches = list(loader)
    assert len(batches) == 3 and isinstance(loader, torch.utils.data.DataLoader)
    for i, batch in enumerate(batches):
        assert torch.equal(torch.as_tensor(batch["moving"][0]), torch.as_tensor(reference[i]["moving"]))
        assert torch.equal(torch.as_tensor(batch["fixed_label"][0]), torch.as_tensor(reference[i]["fixed_label"]))


def test_synthetic_pairs_replay_from_their_index_and_two_ranks_share_the_one_process_stream(toy):
    bank = training_bank("synthetic", toy)
    stream = training_pairs("synthetic", toy, bank, num_pairs=1, seed=3)
    first = [b for b, _ in zip(stream, range(4))]
    resumed = next(iter(stream.skip(2)))
    assert all(torch.equal(resumed[k], first[2][k]) for k in resumed)
    assert not torch.equal(first[0]["moving"], first[1]["moving"])
    ranks = [training_pairs("synthetic", toy, bank, num_pairs=1, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert all(isinstance(r, RankStride) for r in ranks)
    steps = [[b for b, _ in zip(r, range(2))] for r in ranks]
    for step in range(2):
        for rank in range(2):
            assert torch.equal(steps[rank][step]["fixed"], first[2 * step + rank]["fixed"])
    assert torch.equal(next(iter(ranks[1].skip(1)))["moving"], first[3]["moving"])  # a resumed rank


def test_feature_images_come_two_per_pair_without_flips_and_labels_are_bank_classes(toy):
    bank = training_bank("synthetic", toy)
    batch = next(iter(training_images("synthetic", toy, bank, seed=0)))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and int(batch["label"].max()) < bank.num_classes
    assert training_images("synthetic", toy, bank).make_batch.options.flip_probability == 0.0
    assert training_label_values(toy, bank) == list(range(bank.num_classes))
    assert training_label_values(toy) == load_datalist(toy)["label_values"]
    assert training_bank("fixed", toy) is None


def test_a_wrong_kind_option_or_bank_is_a_one_line_config_error(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"pairs must be one of \['fixed', 'synthetic'\], got 'synth'"):
        training_bank("synth", toy)
    bank = training_bank("synthetic", toy)
    with pytest.raises(ConfigError, match="synth_options: .*velocity"):
        training_pairs("synthetic", toy, bank, num_pairs=1, synth_options={"velocity": 2})
    other = LabelBank(bank.maps, np.diag([1.0, 1.0, 1.0, 1.0]), bank.class_values, bank.class_names, bank.sources)
    path = other.save(tmp_path / "bank_1mm.npz")
    with pytest.raises(ConfigError, match=r"bank_1mm.npz: maps of 1 mm voxels, but the prepared data have 2 mm"):
        training_bank("synthetic", toy, path)
    assert len(training_bank("synthetic", toy, path=bank.save(tmp_path / "bank_2mm.npz"))) == 2
    with pytest.raises(DatasetError, match="does not exist"):
        training_bank("synthetic", toy, tmp_path / "missing.npz")


def test_synthetic_pairs_train_every_stage_through_the_bundle_configs(quick_common):
    from deepsim.engine.checkpoints import load_checkpoint
    from deepsim.workflow import run_stage

    models = Path(quick_common["output_dir"]) / "models"
    short = {"max_epochs": 1, "epoch_length": 2, "pairs": "synthetic"}
    run_stage("feature_seg", {**quick_common, **short})
    seg = load_checkpoint(models / "feature_seg.pt")
    assert seg["kwargs"]["num_classes"] == 9 and seg["meta"]["pairs"] == "synthetic"  # 7 toy values + WM + CSF
    for similarity in ("dice", "deepsim-seg"):
        run_stage("registration", {**quick_common, **short, "similarity": similarity, "validation_pairs": 1})
        meta = load_checkpoint(models / f"registration_{similarity}.pt")["meta"]
        assert meta["pairs"] == "synthetic" and meta["iterations"] == 2 and 0 < meta["val/dice"] <= 1
