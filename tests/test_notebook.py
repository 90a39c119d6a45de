"""notebooks/colab_tpu.ipynb runs top to bottom on CPU (its install cell is a no-op here: mllm_jax is importable
from the checkout), so it cannot rot: every cell must execute without error and the plots must come out."""

import os

import pytest
from subprocess_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


@pytest.mark.slow
def test_colab_notebook_executes_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is a fresh process: one CPU device (not conftest's 8), and the checkout on its path.
    monkeypatch.setenv("XLA_FLAGS", child_env()["XLA_FLAGS"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("MLLM_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "the loss, context-planner and pipeline-planner plots"
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend: cpu" in text and "done:" in text
