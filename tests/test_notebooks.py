"""The research notebooks (notebooks/*.ipynb) run top to bottom, headless, on this machine.

Each notebook is executed by nbclient in a fresh kernel running this interpreter, with PYTHONPATH
set to the repository (notebooks/run_notebooks.py); a cell that raises fails the test. On a CPU
the notebooks pick SIZE = "cpu" themselves (tiny shapes, kernels in interpret mode). To refresh
the committed outputs: python notebooks/run_notebooks.py --write
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NB_DIR = os.path.join(os.path.dirname(HERE), "notebooks")


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", os.path.join(NB_DIR, "run_notebooks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUNNER = _runner()
NOTEBOOKS = RUNNER.notebook_paths()
EXPECTED = ["01_quickstart.ipynb", "02_no_sync.ipynb", "03_numerics.ipynb", "04_performance.ipynb"]


def test_the_four_notebooks_exist_with_committed_outputs():
    import nbformat

    assert [os.path.basename(p) for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown"
        stamp = [ln for ln in first.source.splitlines() if ln.startswith(RUNNER.RUN_INFO)]
        assert stamp and "executed" in stamp[0], f"{path}: first cell must say where/when outputs come from"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].source.lstrip().startswith("SIZE = None"), f"{path}: SIZE must be the first line"
        assert all(c.get("outputs") for c in code), f"{path}: a code cell has no committed output"
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path}: committed outputs hold an error: {errors[0].ename}"
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), \
            f"{path}: no inline PNG figure"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    seconds = RUNNER.execute(path, timeout=600)
    print(f"{os.path.basename(path)}: {seconds:.1f} s")
