"""The resolved settings of a bundle stage, as MLflow params: every plain value the stage runs with; and the
datalist splits it reads, as MLflow dataset inputs (``mlflow.log_input``).

A setting is a top-level config key whose value is data, not a component: a number, string, list or dict of
those, or a ``$``/``@`` expression that refers only to other settings (``regularization_weight:
"$@lambdas[@similarity]"`` -> 0.1, ``device`` -> ``cpu``). Components (``_target_``) and anything that refers to
one (``datalist``, the trainer) are left out, so resolving the settings instantiates nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["resolved_settings", "log_settings", "log_inputs"]

_SKIP = {"imports", "initialize", "run", "finalize", "_meta_"}
_REFERENCE = re.compile(r"@([A-Za-z0-9_]+)")


def _references(value: Any) -> set[str] | None:
    """Top-level ids ``value`` refers to, or None when it holds a component."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return None
        found: set[str] = set()
        for item in value.values():
            refs = _references(item)
            if refs is None:
                return None
            found |= refs
        return found
    if isinstance(value, (list, tuple)):
        return _references(dict(enumerate(value)))
    if isinstance(value, str) and value[:1] in ("$", "@"):
        return set(_REFERENCE.findall(value))
    return set()


def resolved_settings(parser) -> dict[str, Any]:
    """``{key: resolved plain value}`` for every setting of a parsed MONAI ``ConfigParser`` (see module doc)."""
    from deepsim.engine.checkpoints import plain_values

    raw = parser.get()
    verdict: dict[str, bool] = {}

    def is_setting(key: str, seen: frozenset = frozenset()) -> bool:
        if key not in verdict:
            refs = _references(raw[key]) if key in raw and key not in _SKIP else None
            verdict[key] = refs is not None and all(r not in seen and is_setting(r, seen | {key}) for r in refs)
        return verdict[key]

    return {key: plain_values(parser.get_parsed_content(key)) for key in raw if is_setting(key)}


#: which datalist splits each stage reads, and the MLflow input context each is logged under
_STAGE_SPLITS = {
    "preprocess": {"training": "training", "validation": "validation", "test": "test"},
    "feature_ae": {"training": "training"},
    "feature_seg": {"training": "training"},
    "registration": {"training": "training", "validation": "validation"},
}


def log_settings(parser, only_new: bool = False) -> None:
    """Log a stage's resolved settings as params of the active run; called once its config is parsed and before
    it runs, so a failing stage keeps its params."""
    from deepsim.tracking import mlflow_tracking as tracking

    tracking.log_params(resolved_settings(parser), only_new=only_new)


def log_inputs(parser, stage: str) -> None:
    """Log the datalist splits a stage read as MLflow dataset inputs of the active run; called after it ran, when
    ``datalist`` is resolved. (Resolving it earlier would prepare the data out of turn: under torchrun that is a
    collective call, and rank 0 alone calling it first made the ranks wait for each other forever.)"""
    from pathlib import Path

    from deepsim.tracking import mlflow_tracking as tracking

    splits = _STAGE_SPLITS.get(stage, {})
    if stage == "evaluate":
        splits = {str(parser.get_parsed_content("split")): "evaluation"} if "split" in parser.get() else {}
    if splits and "datalist" in parser.get():
        dataset = str(parser.get_parsed_content("dataset")) if "dataset" in parser.get() else "dataset"
        name = Path(dataset).name if ("/" in dataset or "\\" in dataset) else dataset
        tracking.log_datalist(parser.get_parsed_content("datalist"), name, splits)
