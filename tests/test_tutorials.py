"""Every tutorial notebook executes top to bottom (on TL 4, which the tutorials target)."""

from pathlib import Path

import pytest

from embedwalk.testing import installed_generation

NOTEBOOKS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


@pytest.mark.skipif(installed_generation() != "bridge", reason="tutorials target TransformerLens 4.x")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # a tutorial that shows nothing has not shown its figures or tables
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
