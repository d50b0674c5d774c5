"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a python3 kernel on this interpreter, a tmp working dir),
and the committed file has no outputs."""

import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_committed_without_outputs():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'pip install -q "git+https://github.com/<org>/ekipl_jax"' in code[0].source


def test_python3_kernel_is_this_interpreter():
  """Kernel 'python3' resolves to this interpreter (jupyter_client maps a spec's bare "python" to sys.executable),
  so the notebook sees the venv's packages without any `ipykernel install`."""
  from jupyter_client.manager import KernelManager

  km = KernelManager(kernel_name="python3")
  assert os.path.realpath(km.format_kernel_cmd()[0]) == os.path.realpath(sys.executable)


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  import nbclient
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this environment: one CPU device as on Colab (conftest forces 8 for the other tests),
  # and the repository root on the path (a checkout that is not installed still finds `configs/`).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t0 = time.time()
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  print(f"quickstart.ipynb: {time.time() - t0:.0f} s")
  assert os.path.exists(tmp_path / "quickstart_out" / "ekipl" / "hf" / "model.safetensors")
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "notebook ran in" in text and '"groups/external_truncated": 0.0' in text
