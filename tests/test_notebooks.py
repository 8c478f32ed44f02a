"""The notebooks in ``notebooks/`` run top to bottom, on CPU, and are committed without outputs.

Each notebook is executed with nbclient in a fresh kernel of *this* interpreter
(ipykernel's own kernel spec, so a ``python3`` kernel registered elsewhere on
the machine cannot stand in), in a temporary working directory, with
``LIFTCAM_NOTEBOOK_SMOKE=1`` (the notebooks shrink their settings) and
``JAX_PLATFORMS=cpu``. A failing cell fails the test with the cell's number,
its first lines and the kernel's traceback.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = ("paper_evaluation.ipynb", "quickstart.ipynb", "tfds_batch.ipynb")
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; the whole of a smoke run takes far less

PROBE = "import sys\nprint(sys.executable)"


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _kernel_manager() -> KernelManager:
    """A kernel manager for ipykernel's native spec: the kernel runs ``sys.executable``.

    ``kernel_dirs=[]`` hides kernel specs installed on the machine (a user's
    ``python3`` could point at another Python); the native spec is built from
    the running interpreter by ipykernel itself.
    """
    ksm = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    spec = ksm.get_kernel_spec(NATIVE_KERNEL_NAME)
    assert os.path.realpath(spec.argv[0]) == os.path.realpath(sys.executable), spec.argv
    return KernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=ksm)


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def test_the_notebooks_are_all_here():
    assert set(EXPECTED) <= set(NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{name} cell {i} has outputs (python notebooks/strip_outputs.py)"
        assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{name} cell {i} has execution timings"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_and_smoke_switch(name):
    """The first code cell installs from REPO_URL / LOCAL_CHECKOUT unless liftcam_jax imports; settings obey the smoke switch."""
    nb = _read(name)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    for needle in ('REPO_URL = "', 'LOCAL_CHECKOUT = "', 'find_spec("liftcam_jax")', '"git+" + REPO_URL',
                   '"pip", "install"'):
        assert needle in first, f"{name}: install cell lacks {needle!r}"
    assert any('os.environ.get("LIFTCAM_NOTEBOOK_SMOKE")' in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTCAM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    nb = _read(name)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))  # which Python the kernel really runs
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        failed = next((i for i, c in enumerate(nb.cells)
                       if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                      None)
        where = ""
        if failed is not None:
            src = "\n".join(nb.cells[failed].source.splitlines()[:6])
            where = f" in cell {failed - 1} (counting from 0, markdown included):\n{src}\n..."
        pytest.fail(f"{name} failed{where}\n{type(e).__name__}: {e}", pytrace=False)
    seconds = time.perf_counter() - t0
    print(f"\n{name}: executed in {seconds:.1f} s")
    ran = _text(nb.cells[0].outputs).strip()
    assert os.path.realpath(ran) == os.path.realpath(sys.executable), (ran, sys.executable)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"{name} cell {i - 1} did not run"
    written = sorted(os.listdir(tmp_path))  # the working directory: everything goes under OUT_ROOT
    assert written in ([], ["liftcam-out"]), f"{name} wrote outside its OUT_ROOT folder: {written}"
