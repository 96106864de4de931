"""The record of one ``deepsim run`` in its output folder: what ``deepsim run --resume`` continues.

``<out>/run_record.json`` holds the settings that define the run (profile and a hash of its file, seed, losses,
bundle), the MLflow tracking URI, experiment and parent run, and one entry per stage run: its MLflow run id and
whether it finished. It is rewritten atomically whenever a stage starts or ends, by the main process only.

``--resume`` skips finished stages, continues the interrupted one in its own MLflow run (the bundle stage gets
``resume: true`` and restores ``models/<stage>.state.pt``, see :mod:`deepsim.engine.resume`) and runs the rest as
usual; it refuses a record made with other settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepsim.engine.distributed import is_main_process
from deepsim.errors import ConfigError
from deepsim.io import atomic_write

__all__ = ["RECORD_NAME", "RunRecord", "run_settings"]

RECORD_NAME = "run_record.json"


def run_settings(profile: Any, seed: int, losses: list[str]) -> dict[str, Any]:
    """What must be equal for ``--resume`` to continue a run: profile (name and file content), seed, losses."""
    source = Path(profile.source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16] if source.is_file() else ""
    return {"profile": profile.name, "profile_sha256": digest, "bundle": profile.bundle, "seed": int(seed),
            "losses": list(losses)}


@dataclass
class RunRecord:
    """Settings, MLflow ids and stage progress of one pipeline run (see the module docstring)."""

    path: Path
    settings: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumes: int = 0

    @classmethod
    def start(cls, output_dir: str | Path, settings: Mapping[str, Any], tracking_uri: str,
              experiment: str) -> RunRecord:
        """A new record (replacing any earlier one in ``output_dir``), written at once."""
        record = cls(Path(output_dir) / RECORD_NAME, dict(settings), tracking_uri, experiment)
        record.save()
        return record

    @classmethod
    def load(cls, output_dir: str | Path) -> RunRecord:
        """The record of the run in ``output_dir``; ConfigError when there is none or it is unreadable."""
        path = Path(output_dir) / RECORD_NAME
        if not path.is_file():
            raise ConfigError(f"--resume: {path} not found: {output_dir} holds no interrupted deepsim run "
                              "(run without --resume to start one)")
        try:
            raw = json.loads(path.read_text())
            return cls(path=path, **{k: raw[k] for k in ("settings", "tracking_uri", "experiment")},
                       parent_run_id=raw.get("parent_run_id"), stages=dict(raw.get("stages", {})),
                       resumes=int(raw.get("resumes", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--resume: {path} is not a readable run record ({type(exc).__name__}: {exc})") from None

    def check_same(self, settings: Mapping[str, Any]) -> None:
        """ConfigError naming every setting that differs from the recorded run's."""
        differ = sorted(k for k in settings.keys() | self.settings.keys() if settings.get(k) != self.settings.get(k))
        if differ:
            what = "; ".join(f"{k} {self.settings.get(k)!r}, now {settings.get(k)!r}" for k in differ)
            raise ConfigError(f"--resume: {self.path.parent} was started with other settings ({what}); resume "
                              "with the same profile, seed and losses, or run without --resume into another --out")

    def save(self) -> None:
        if not is_main_process():
            return
        content = {k: v for k, v in asdict(self).items() if k != "path"}
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1) + "\n"))

    def stage_started(self, name: str, run_id: str) -> None:
        self.stages[name] = {"run_id": run_id, "done": False}
        self.save()

    def stage_done(self, name: str) -> None:
        self.stages[name]["done"] = True
        self.save()

    def done(self, name: str) -> bool:
        return bool(self.stages.get(name, {}).get("done"))

    def run_id(self, name: str) -> str | None:
        """The MLflow run of stage ``name`` if it was started (to continue it), else None."""
        return self.stages.get(name, {}).get("run_id")
