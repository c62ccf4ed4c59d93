"""Every notebook in notebooks/ executes end to end (small data) and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, shared_data, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("PYRO_VMM_DATA", str(shared_data))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYRO_VMM_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # notebooks shorten their runs when set (CI)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
