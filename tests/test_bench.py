"""The benchmarks as a user runs them, on small configs: ``bench train --analyze`` reports XLA's
counts of the scanned step (flat in depth), ``bench sample`` compiles each program once, and the
device suite writes its one JSON (cuDNN skipped on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config=configs/tiny.py", "--config.data.hr_size=32", "--config.data.map_size=16",
         "--config.text.max_length=16", "--config.model.width=64", "--config.model.num_heads=4",
         "--config.model.context_latents=8", "--config.model.context_heads=4"]


def _bench(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.bench", *args, "--json"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_train_analyze_counts_the_scanned_step_and_stays_flat_in_depth():
  shallow = _bench("train", "--analyze", *SMALL, "--config.batch_size=2",
                   "--config.model.depth=2")
  deep = _bench("train", "--analyze", *SMALL, "--config.batch_size=2", "--config.model.depth=8")
  for r in (shallow, deep):
    assert 0 < r["model_flops_share"] < 1 and 0 < r["frozen_flops_share"] < 1
    assert r["hlo_instructions"] > 100 and r["compile_s"] > 0
    assert r["attention"] == "xla"
  # The layers are one scanned loop: the program does not grow with depth, the FLOPs do.
  assert abs(deep["hlo_instructions"] - shallow["hlo_instructions"]) <= (
      0.1 * shallow["hlo_instructions"])
  assert deep["xla_flops_per_image"] > 1.5 * shallow["xla_flops_per_image"]


def test_sample_bench_compiles_each_program_once():
  r = _bench("sample", *SMALL, "--sample_size=32", "--sample_steps=2", "--sample_large=64",
             "--sample_large_execute", "--repeats=1")
  assert r["programs_compiled"] == 2  # the timed batch and the tiled large output
  assert r["images_per_s"] > 0 and r["large_tiles"] > 1 and r["large_xla_bytes"] > 0


def test_device_suite_writes_one_json(tmp_path):
  out = tmp_path / "suite.json"
  r = _bench("suite", *SMALL, f"--suite_output={out}", "--suite_probe_batch=2",
             "--suite_sample_size=32", "--suite_sample_steps=2", "--suite_large=64",
             "--suite_train_repeats=1", "--repeats=1", timeout=1200)
  assert r["output"] == str(out)
  result = json.loads(out.read_text())
  assert result["train"]["images_per_s"] > 0 and result["train"]["probe"]["compile_s"] > 0
  assert "cuDNN attention needs a GPU" in result["attention"]["skipped"]
  assert result["sample"]["images_per_s"] > 0
  assert result["sample"]["large_peak_memory_bytes"] > 0
  assert not any("error" in result[p] for p in ("train", "attention", "sample"))


@pytest.mark.parametrize("bench", ["train", "sample", "suite", "data"])
def test_help_shows_the_bench_flags(bench):
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.bench", bench, "--help"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  flag = {"train": "--[no]analyze", "sample": "--sample_size", "suite": "--suite_output",
          "data": "--data_"}[bench]
  assert flag in r.stdout, r.stdout[-2000:]


def _bench_error(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.bench", *args], capture_output=True,
                     text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
  return r.stderr.strip()


def test_evaluate_bench_reads_only_the_folders_it_is_given(tmp_path):
  """No folder outside the repository is read by default (RealSR sits beside some checkouts):
  without flags the bench scores synthetic pairs; with them, those folders; one without the
  other or a missing folder is one error line naming the flag."""
  from PIL import Image
  import numpy as np
  synthetic = _bench("evaluate", "--evaluate_images=2", "--evaluate_batch=2", "--repeats=1")
  assert synthetic["source"] == "synthetic" and synthetic["images"] == 2
  rng = np.random.default_rng(0)
  for sub in ("pred", "gt"):
    (tmp_path / sub).mkdir()
    for name in ("a", "b"):
      Image.fromarray(rng.integers(0, 256, (96, 192, 3), np.uint8)).save(
          tmp_path / sub / f"{name}.png")
  pred, gt = str(tmp_path / "pred"), str(tmp_path / "gt")
  real = _bench("evaluate", f"--evaluate_pred={pred}", f"--evaluate_gt={gt}", "--repeats=1")
  assert real["source"] == pred and real["images"] == 2 and "mean_psnr" in real
  assert _bench_error("evaluate", f"--evaluate_pred={pred}") == (
      "error: --evaluate_gt: required with --evaluate_pred (the bench scores pairs of the two "
      "folders)")
  assert _bench_error("evaluate", f"--evaluate_pred={pred}", f"--evaluate_gt={tmp_path}/no") == (
      f"error: --evaluate_gt={tmp_path}/no: not a directory")
