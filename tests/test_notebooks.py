"""The notebooks in notebooks/ run top to bottom, and are committed without outputs.

Each notebook is executed by nbclient in a fresh kernel whose working directory is a temporary folder, so
everything it writes (its ``deepsim_output/...`` folder, MLflow store included) stays out of the repository. Values
of the cell tagged ``parameters`` can be overridden the way papermill does it: a cell with the new assignments is
inserted right after it. Measured on the shared 2-core CPU (load 2-4): 25-45 s, 48-81 s and 60-78 s for the three
notebooks, 134-157 s for the whole file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # per cell; the longest, the registration in 02, took 31-49 s on 2 shared cores
# Overrides per notebook (by file stem): where it finds the repository when it does not run in notebooks/.
PARAMETERS = {"03_semantic_vs_intensity_losses": {"REPO": str(REPO)}}


def _with_parameters(nb, values: dict) -> None:
    """Insert ``NAME = value`` lines after the cell tagged ``parameters`` (papermill's convention)."""
    import nbformat

    if not values:
        return
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(index + 1, cell)


def _kernel_of_this_python(folder: Path, monkeypatch) -> str:
    """A kernel spec that starts this very interpreter: a user-wide ``python3`` spec may point at another one."""
    spec = folder / "kernels" / "deepsim-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "deepsim tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(folder))
    return "deepsim-tests"


def test_every_notebook_is_committed_without_outputs():
    """Outputs and execution counts stay out of git: diffs stay readable and nothing stale is shown."""
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_register_your_own_images",
                                           "03_semantic_vs_intensity_losses"]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [], f"{path.name}: cell {i} has outputs; strip them before committing"
                assert cell["execution_count"] is None, f"{path.name}: cell {i} has an execution count"
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """The notebook executes top to bottom without an error, in a temporary folder, writing nothing into the repo."""
    import nbclient  # the test extra installs these three, with ipykernel
    import nbformat

    # The kernel inherits this environment: an MLflow URI set by an earlier test must not redirect its runs.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = sorted(p.name for p in (REPO / "notebooks").iterdir())
    nb = nbformat.read(str(path), as_version=4)
    _with_parameters(nb, PARAMETERS.get(path.stem, {}))
    kernel = _kernel_of_this_python(tmp_path / "jupyter", monkeypatch)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / path.name))  # the executed copy, outputs and error included, to look at
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} drew no figure"
    assert sorted(p.name for p in (REPO / "notebooks").iterdir()) == before
