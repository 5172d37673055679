"""The trainer: exact resume, end-to-end train -> report -> sample, and clear errors for bad
input (sharded step equality and the other scale tests: tests/test_scale.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmsr_jax.runtime import sharding
from tests.conftest import small_config
from mmsr_jax.training import sr_task
from mmsr_jax.data import sr_examples
from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.inference.super_resolver import SuperResolver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(state):
  return jax.device_get(state.params)


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# The 8-device vs 1-device step equality (data, FSDP and tensor axes) is in tests/test_scale.py.


def test_resume_continues_exactly(config, tmp_path):
  devices = jax.devices()[:2]
  straight = sr_task.train(config, str(tmp_path / "a"), devices=devices, write_report=False)
  first = sr_task.train(config, str(tmp_path / "b"), devices=devices, stop_at=4, write_report=False)
  assert int(first.step) == 4
  resumed = sr_task.train(config, str(tmp_path / "b"), devices=devices, write_report=False)
  assert int(resumed.step) == int(straight.step) == config.num_train_steps
  _assert_trees_close(_params(resumed), _params(straight), atol=0)
  _assert_trees_close(jax.device_get(resumed.opt_state), jax.device_get(straight.opt_state), atol=0)
  _assert_trees_close(jax.device_get(resumed.ema_params), jax.device_get(straight.ema_params),
                      atol=0)


def test_resume_refuses_an_incompatible_config(config, tmp_path):
  sr_task.train(config, str(tmp_path), devices=jax.devices()[:1], stop_at=1, write_report=False)
  config.model.width = 32
  with pytest.raises(ValueError, match="model.width"):
    sr_task.train(config, str(tmp_path), devices=jax.devices()[:1], write_report=False)


def test_end_to_end_train_report_and_sample(config, tmp_path):
  workdir = str(tmp_path / "run")
  sr_task.train(config, workdir, devices=jax.devices()[:1])
  report = json.load(open(os.path.join(workdir, "report.json")))
  for key in ("first_train_loss", "final_train_loss", "psnr_sr", "ssim_sr", "psnr_bicubic",
              "ssim_bicubic"):
    assert np.isfinite(report[key]), key
  assert set(report["val_loss"]) >= {"all", "none"}
  assert report["val_loss"]["all"] != report["val_loss"]["none"]
  assert 20 < report["psnr_bicubic"] < 40 and 0 < report["ssim_bicubic"] <= 1
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  grids = os.listdir(os.path.join(workdir, "samples"))
  assert sorted(grids) == ["chelsea.png", "coffee.png"]
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "chelsea.png")))
  assert grid.shape == (32, 4 * 32 + 3 * 4, 3)

  sr = SuperResolver.from_workdir(workdir)
  img = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)  # odd sizes
  a = sr(img, caption="a cat", steps=2)
  assert a.shape == (36, 52, 3) and a.dtype == np.uint8
  b = sr(img, caption="a cat", steps=2)
  np.testing.assert_array_equal(a, b)  # same seed, same output
  c = sr(img, caption="a cat", steps=2, temperature={"depth": 1.0, "seg": 1.0, "edge": 1.0,
                                                      "text": 1.0})
  np.testing.assert_array_equal(a, c)
  d = sr(img, caption="a cat", steps=2, seed=1)
  assert np.abs(a.astype(int) - d).max() > 0


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_errors_are_one_clear_line(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  r = _run("mmsr_jax.train", f"--workdir={tmp_path}/w", "--config.model.no_such_field=1")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: --config.model.no_such_field: no such config field ('no_such_field' is not in "
      "the config file's fields)"]
  assert not os.path.exists(tmp_path / "w")

  (tmp_path / "empty_run").mkdir()
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/empty_run", f"--input={bad}",
           f"--output={tmp_path}/out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "bad.png: not a readable image" in r.stderr
  assert not os.path.exists(tmp_path / "out")

  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/empty_run", f"--input={good}",
           f"--output={tmp_path}/out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "config.json not found" in r.stderr


  # A run folder with its config but no checkpoint yet.
  from mmsr_jax.runtime import checkpoint
  checkpoint.save_config(str(tmp_path / "no_ckpt"), small_config())
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/no_ckpt", f"--input={good}",
           f"--output={tmp_path}/out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "no checkpoints" in r.stderr
  assert not os.path.exists(tmp_path / "out")


def test_condition_dropout_selects_the_null_blocks(config):
  """With modality dropout 1 every map is replaced by its null block, so the maps no longer
  change the loss; with dropout 0 they do."""
  batch = next(iter(sr_examples.make_train_loader(config, make_tokenizer("byte"))))
  changed = dict(batch, edge=-batch["edge"], depth=np.ones_like(batch["depth"]),
                 present=np.ones_like(batch["present"]))
  losses = {}
  for p in (1.0, 0.0):
    config.cond_dropout.modality = p
    trainer = sr_task.SRTask(config, "/unused", devices=jax.devices()[:1])
    # Two steps first (the first has lr 0 under warm-up): the zero-initialised output layer
    # ignores every input at init.
    state = trainer.init_state()
    for _ in range(2):
      state, _ = trainer.train_step(state, trainer.frozen,
                                    sharding.global_batch(batch, trainer.mesh))
    for name, b in (("orig", batch), ("changed", changed)):
      _, metrics = trainer.train_step(jax.tree.map(jnp.copy, state), trainer.frozen,
                                      sharding.global_batch(b, trainer.mesh))
      losses[p, name] = float(metrics["loss"])
  assert losses[1.0, "orig"] == losses[1.0, "changed"]
  assert abs(losses[0.0, "orig"] - losses[0.0, "changed"]) > 1e-7
