"""Whether an MLflow run is active, asked without importing MLflow.

A run can only be active in a process that imported ``mlflow`` (starting a run imports it), so where ``mlflow``
is not among the loaded modules the answer is "none" — which lets training code run on a machine without MLflow
(the GPU machine gets our package, MONAI and nibabel only) and keeps ``import mlflow``'s ~2 s out of runs that
track nothing.
"""

from __future__ import annotations

import sys

__all__ = ["active_run_id"]


def active_run_id() -> str | None:
    """The id of the active MLflow run, or None."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    run = mlflow.active_run()
    return None if run is None else run.info.run_id
