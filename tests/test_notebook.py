"""The Colab sampling notebook runs headless (nbclient) on a CPU with the tiny configuration."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import save_random_run, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_sampling.ipynb")


def test_colab_notebook_runs_headless(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = str(tmp_path / "run")
  save_random_run(workdir, small_config(), devices=jax.devices()[:1], seed=11)
  image = tmp_path / "photo.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8), "RGBA").save(image)
  output = tmp_path / "sr.png"
  for key, value in {"MMSR_WORKDIR": workdir, "MMSR_IMAGE": str(image), "MMSR_OUTPUT": str(output),
                     "MMSR_STEPS": "2", "MMSR_CAPTION": "a test", "JAX_PLATFORMS": "cpu",
                     "PYTHONPATH": REPO}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device in the kernel
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures

  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError on any failing cell

  texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs)
  assert "not on Colab: skipping the install" in texts
  assert "web demo: not started here" in texts  # no server in the headless run
  assert "[9, 11] -> [36, 44]" in texts
  figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "image/png" in o.get("data", {})]
  assert figures, "the LR / bicubic / SR figure was not shown"
  with Image.open(output) as im:
    assert im.mode == "RGBA" and im.size == (44, 36)
