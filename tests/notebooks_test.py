"""The ablation notebooks (notebooks/README.md): each .ipynb is the jupytext pair of its .py source
with no outputs in git, and each runs to the end with its short parameters (``QUICK=True``).

Execution uses papermill with a kernel spec written here for this interpreter (``sys.executable``
with this checkout first on ``PYTHONPATH``), so a fresh CI machine needs no ``ipython kernel
install``. The kernel compiles without most XLA optimisations (the short runs are all
compilation) and sees one CPU device, not the eight simulated ones of the other tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
KERNEL = "scm-jax-notebook-test"

jupytext = pytest.importorskip("jupytext", reason="needs the notebooks extra (jupytext)")
nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra (nbformat)")


def test_there_are_notebooks():
    assert len(SOURCES) == 5, [p.name for p in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_the_paired_source_without_outputs(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} is missing: run `jupytext --sync {source}`"
    nb = nbformat.read(ipynb, as_version=4)
    py = jupytext.read(source)
    pairs = list(zip(nb.cells, py.cells, strict=False))
    fix = f"out of sync with {source.name}: run `jupytext --sync {source}` (or --to ipynb)"
    assert len(nb.cells) == len(py.cells), fix
    for a, b in pairs:
        assert (a.cell_type, a.source.strip()) == (b.cell_type, b.source.strip()), fix
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{ipynb.name} has outputs in git: clear them (jupytext --to ipynb {source.name})"
            )
    assert "ipynb" in nb.metadata.get("jupytext", {}).get("formats", ""), "not a paired notebook"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "QUICK = False" in tagged[0].source, "one parameters cell"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec running this interpreter on this checkout, found through JUPYTER_PATH."""
    pytest.importorskip("papermill", reason="needs the notebooks extra (papermill)")
    pytest.importorskip("ipykernel", reason="needs the notebooks extra (ipykernel)")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    flags = os.environ.get("XLA_FLAGS", "").split()
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "XLA_FLAGS": " ".join(f for f in flags if "device_count" not in f),
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "MPLBACKEND": "Agg",
    }
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel_json = {"argv": argv, "display_name": KERNEL, "language": "python", "env": env}
    (spec / "kernel.json").write_text(json.dumps(kernel_json))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), old) if p)
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_with_short_parameters(source, kernel, tmp_path):
    import papermill

    out_dir = tmp_path / "figures"
    papermill.execute_notebook(
        str(source.with_suffix(".ipynb")), str(tmp_path / source.with_suffix(".ipynb").name),
        parameters={"QUICK": True, "FIG_DIR": str(out_dir)}, kernel_name=kernel,
        cwd=str(tmp_path), progress_bar=False, log_output=False,
    )  # fmt: skip
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs and all(p.startswith(source.stem[:2]) for p in pngs), pngs
