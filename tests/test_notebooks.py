"""Every notebook runs top to bottom offline (nbclient), with small step counts, and is
committed without outputs.  A failing cell fails the test."""

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# Small runs on one thread; an empty weights cache makes 02 take its offline path everywhere.
QUICK = {"CLIPGUIDE_EXAMPLE_STEPS": "4", "CLIPGUIDE_EXAMPLE_CUTN": "2", "CLIPGUIDE_EXAMPLE_IMAGES": "2",
         "CLIPGUIDE_EXAMPLE_PRESET": "shapes",  # the recipe without the prior: no 512 candidates per run
         "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_the_four_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_reproduce_aleph2image", "03_audit",
                                           "04_prompts_and_blending"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    for key, value in QUICK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path / "empty-cache"))
    book = nbformat.read(path, as_version=4)  # executed in memory: the file keeps no outputs
    book.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert book.cells[-1].outputs[0]["text"].strip() == sys.executable, "the kernel runs another interpreter"
    kinds = [o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in d for d in kinds), "the notebook showed no image"
