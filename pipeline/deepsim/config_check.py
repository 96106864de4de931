"""Checks of a profile JSON before anything runs: known keys, value types that match the bundle's defaults, and
values in their allowed range (:data:`VALUE_RULES`).

A profile's values become bundle overrides, and MONAI accepts any override: a misspelt key (``max_epoch``) would be
added beside the real one and silently ignored, a wrong type (``"max_epochs": "3"``) would fail deep inside ignite
after the data were prepared, and a negative learning rate, a NaN λ or an unknown precision would fail (or train
nonsense) after ``data/`` and ``mlflow.db`` were written. :func:`check_profile` refuses all of them up front with a
one-line ConfigError that names the file, the key path, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from deepsim.errors import ConfigError

__all__ = ["check_profile", "VALUE_RULES"]

_TOP_TYPES = {"description": str, "experiment": str, "bundle": str, "common": dict, "losses": list,
              "stages": dict, "lambdas": dict, "hybrids": list, "networks_after_affine": bool}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _ints(low: int, length: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, list) and len(v) > 0 and (length is None or len(v) == length)
                      and all(_integer(low)(x) for x in v))


_POSITIVE = (lambda v: _number(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a finite number >= 0")

#: key -> (check, what is allowed): applied wherever the key appears (common, a stage, a loss's stage values)
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": _POSITIVE,
    "spacing_mm": _POSITIVE,
    "regularization_weight": _NON_NEGATIVE,
    "noise_std": _NON_NEGATIVE,
    "time_limit_s": (lambda v: v is None or (_number(v) and v > 0), "null or a finite number > 0"),
    "max_epochs": (_integer(1), "an integer >= 1"),
    "epoch_length": (_integer(1), "an integer >= 1"),
    "validation_pairs": (_integer(1), "an integer >= 1"),
    "checkpoint_every": (_integer(1), "an integer >= 1"),
    "augment_copies": (_integer(0), "an integer >= 0"),
    "iterations": (_integer(0), "an integer >= 0"),
    "downsample": (_integer(1), "an integer >= 1"),
    "seed": (_integer(0, 2**32 - 1), "an integer from 0 to 2**32 - 1"),
    "spatial_dims": (lambda v: v in (2, 3) and not isinstance(v, bool), "2 or 3"),
    "precision": (lambda v: v in ("fp32", "bf16"), '"fp32" or "bf16"'),
    "alignment": (lambda v: v in ("centre", "affine"), '"centre" or "affine"'),
    "pairs": (lambda v: v in ("fixed", "synthetic"), '"fixed" or "synthetic"'),
    "feature_channels": (_ints(1), "a non-empty list of integers >= 1"),
    "registration_channels": (_ints(1), "a non-empty list of integers >= 1"),
    "roi_size": (lambda v: v is None or _ints(1)(v), "null or a list of integers >= 1"),
    "time_gaps": (_ints(1), "a non-empty list of integers >= 1"),
    "split_at": (lambda v: _ints(1, 2)(v) and v[0] < v[1], "two increasing integers [a, b]"),
    "dataset": (lambda v: isinstance(v, str) and v.strip() != "", "a dataset name or path"),
    "lambdas": (lambda v: isinstance(v, dict) and all(_number(w) and w >= 0 for w in v.values()),
                "an object of finite numbers >= 0"),
}
#: datasets generated at a fixed spacing: a profile's other spacing would be recorded in checkpoints, not used
_FIXED_SPACING = {"toy": 2.0}


def _check_rule(path: Path, where: str, value: Any) -> None:
    rule = VALUE_RULES.get(where.rsplit(".", 1)[-1])
    if rule is not None and not _is_reference(value) and not rule[0](value):
        raise ConfigError(f"{path}: {where} must be {rule[1]}, got {json.dumps(value)}")


def _json_type(value: Any) -> type | None:
    """The JSON kind of ``value`` (bool before int: JSON true is no number here)."""
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    return None


def _is_reference(value: Any) -> bool:
    """A MONAI expression or reference (``$...``, ``@...``), or a component (``_target_``): no plain type."""
    return (isinstance(value, str) and value[:1] in ("$", "@")) or (isinstance(value, dict) and "_target_" in value)


def _check_value(path: Path, where: str, value: Any, default: Any) -> None:
    _check_type(path, where, value, default)
    _check_rule(path, where, value)


def _check_type(path: Path, where: str, value: Any, default: Any) -> None:
    if default is None or _is_reference(default) or _is_reference(value):
        return
    want, got = _json_type(default), _json_type(value)
    if want is float and got in (int, float):
        return
    if want is not got:
        raise ConfigError(f"{path}: {where} must be {_TYPE_NAMES.get(want, want)} like the bundle's default "
                          f"{json.dumps(default)}, got {json.dumps(value)}")
    if want is dict:
        for key, item in value.items():
            _check_value(path, f"{where}.{key}", item, default.get(key))


def _check_overrides(path: Path, where: str, overrides: Any, defaults: Mapping[str, Any]) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: {where} must be an object of bundle values, got {json.dumps(overrides)}")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{path}: {where} has unknown keys {unknown} (not in the bundle's configs; a typo?)")
    for key, value in overrides.items():
        _check_value(path, f"{where}.{key}", value, defaults[key])


def _read(configs: Path, name: str) -> dict:
    return json.loads((configs / name).read_text())


def check_profile(path: Path, raw: Mapping[str, Any], configs: Path, stage_files: Mapping[str, str],
                  losses: list[str] | tuple[str, ...]) -> None:
    """ConfigError unless every value of profile ``raw`` (read from ``path``) fits the bundle in ``configs``.

    ``stage_files``: stage name -> config file name (``workflow.STAGE_FILES``); ``losses``: the known loss names.
    """
    for key, kind in _TOP_TYPES.items():
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"{path}: {key} must be {_TYPE_NAMES[kind]}, got {json.dumps(raw[key])}")
    if not all(isinstance(loss, str) for loss in raw.get("losses", [])):
        raise ConfigError(f"{path}: losses must be a list of loss names, got {json.dumps(raw['losses'])}")
    bad = [loss for loss in raw.get("hybrids", []) if loss not in losses or loss == "ncc-sup"]
    if bad:
        raise ConfigError(f"{path}: hybrids {bad} are not losses with a test-time form; choose from "
                          f"{[loss for loss in losses if loss != 'ncc-sup']}")
    for loss, weight in raw.get("lambdas", {}).items():
        if loss not in losses:
            raise ConfigError(f"{path}: lambdas has the unknown loss {loss!r}; choose from {list(losses)}")
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{path}: lambdas.{loss} must be a number >= 0, got {json.dumps(weight)}")
    common = _read(configs, "common.json")
    stages = {name: {**common, **_read(configs, file)} for name, file in stage_files.items()
              if (configs / file).is_file()}
    everything = {k: v for defaults in stages.values() for k, v in defaults.items()}
    _check_overrides(path, "common", raw.get("common", {}), {**everything, **common})
    for name, overrides in raw.get("stages", {}).items():
        if name == "registration_by_loss":
            if not isinstance(overrides, dict):
                raise ConfigError(f"{path}: stages.registration_by_loss must map losses to objects")
            for loss, values in overrides.items():
                if loss not in losses:
                    raise ConfigError(f"{path}: stages.registration_by_loss has the unknown loss {loss!r}")
                _check_overrides(path, f"stages.registration_by_loss.{loss}", values, stages["registration"])
        elif name in stages:
            _check_overrides(path, f"stages.{name}", overrides, stages[name])
        else:
            raise ConfigError(f"{path}: stages has the unknown stage {name!r}; known: "
                              f"{sorted([*stages, 'registration_by_loss'])}")
    dataset = raw.get("common", {}).get("dataset", common.get("dataset"))
    spacing = raw.get("common", {}).get("spacing_mm")
    if dataset in _FIXED_SPACING and spacing is not None and spacing != _FIXED_SPACING[dataset]:
        raise ConfigError(f"{path}: common.spacing_mm {json.dumps(spacing)}: the {dataset} dataset is generated at "
                          f"{_FIXED_SPACING[dataset]:g} mm and would ignore it (while checkpoints recorded it); remove "
                          f"the key or set {_FIXED_SPACING[dataset]:g}")
