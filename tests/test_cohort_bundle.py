"""The brain bundle's ``configs/cohort.json``: both levels of ``deepsim cohort`` from ``python -m monai.bundle run``,
on the example study at 4 mm with an untrained 4 mm model (the plumbing, not the accuracy): derivatives and the group
report written, a corrupt subject named in the error after the others are done."""

import sys
from pathlib import Path

import pytest
from monai.bundle import run

from deepsim.data.example_study import make_example_dataset
from deepsim.errors import DatasetError
from deepsim.resources import bundle_dir
sys.path.insert(0, str(Path(__file__).parent))
from test_cohort_cli import _model  # noqa: E402

pytestmark = pytest.mark.slow


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_the_cohort_bundle_runs_both_levels_and_names_a_failed_subject(tmp_path):
    raw = make_example_dataset(tmp_path / "raw", n_subjects=3, spacing_mm=4.0, seed=2)
    bad = raw / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "out"
    config = Path(bundle_dir("brain_mri")) / "configs" / "cohort.json"
    with pytest.raises(Exception) as info:
        run(config_file=str(config), bids_dir=str(raw), output_dir=str(out), template="MNI152NLin2009aSym:res-4",
            model=str(_model(tmp_path / "model.pt")), labels_dir=str(raw / "derivatives" / "labels"),
            speed="fast", device="cpu")
    error = _cause(info.value, DatasetError)
    assert error is not None and "1 subject(s) failed" in str(error), info.value
    assert (out / "dataset_description.json").is_file() and (out / "group_report.html").is_file()
    assert "sub-02_T1w.nii.gz" in (out / "group_report.html").read_text()
    for subject in ("sub-01", "sub-03"):
        anat = out / subject / "anat"
        assert (anat / f"{subject}_from-T1w_to-MNI152NLin2009aSymres4_mode-image_xfm.nii.gz").is_file()
        assert (anat / f"{subject}_from-MNI152NLin2009aSymres4_to-T1w_mode-image_xfm.nii.gz").is_file()
        assert (anat / f"{subject}_registration.json").is_file()
    assert not list(out.glob("sub-02/anat/*_xfm.nii.gz"))  # the failed subject has no derivatives
