"""Executes every notebook in notebooks/ in a fresh kernel, and checks they are committed without outputs.

The kernel is pinned to *this* interpreter through a throwaway kernelspec (argv = sys.executable), so the
test runs the same on a fresh clone where only `pip install -e .[test]` ran: it needs no registered
user kernel, writes nothing under $HOME, and cannot pick up another environment's python3.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest

from tests.conftest import xla_flags

nbclient = pytest.importorskip("nbclient", reason="nbclient is part of the [test] extra")
pytest.importorskip("ipykernel", reason="ipykernel is part of the [test] extra")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "conspo-jax-test"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "data" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "conspo-jax (test interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "data"))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        mp.setenv("JUPYTER_CONFIG_DIR", str(root / "config"))
        mp.setenv("IPYTHONDIR", str(root / "ipython"))
        mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
        mp.delenv("MPLBACKEND", raising=False)  # the kernel then uses its headless inline backend
        # One CPU device is plenty for a notebook; keeps the kernel's start-up light.
        mp.setenv("XLA_FLAGS", xla_flags("--xla_force_host_platform_device_count=1"))
        yield KERNEL


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name} drew no figure"
