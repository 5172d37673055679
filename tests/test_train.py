"""The trainer: exact resume, end-to-end train -> report -> sample, and clear errors for bad
input (sharded step equality and the other scale tests: tests/test_scale.py)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmsr_jax.schema import tasks
from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.runtime import checkpoint, sharding
from mmsr_jax.system import System
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


def _overwrite_4kib(step_dir: str) -> str:
  """Overwrites 4 KiB in the middle of the largest file of a saved state (same size, as a bad
  disk block or a stray write would); returns its path relative to ``step_dir``."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  with open(biggest, "r+b") as f:
    f.seek(size // 2)
    f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  assert os.path.getsize(biggest) == size
  return os.path.relpath(biggest, step_dir)


def test_a_corrupt_checkpoint_is_named_and_an_older_good_one_resumes(config, tmp_path, capsys):
  devices, wd = jax.devices()[:1], str(tmp_path)
  good = _params(sr_task.train(config, wd, devices=devices, write_report=False))  # saves 3, 6
  saved_config = open(checkpoint.config_path(wd)).read()
  rel = _overwrite_4kib(os.path.join(wd, "checkpoints", "6"))

  # Asked for explicitly, the damaged step is a one-line error naming it and the file.
  with pytest.raises(checkpoint.CorruptCheckpoint,
                     match=rf"checkpoints/6 is corrupt: {rel} does not match the checksum"):
    sr_task.train(config, wd, devices=devices, write_report=False, restore_step=6)
  assert checkpoint.saved_steps(wd) == [3, 6]
  assert open(checkpoint.config_path(wd)).read() == saved_config

  # By default it is logged, moved aside (not deleted) and the run continues from step 3, to
  # exactly the weights the undamaged run had.
  capsys.readouterr()
  resumed = sr_task.train(config, wd, devices=devices, write_report=False)
  out = capsys.readouterr().out
  assert f"checkpoints/6 is corrupt: {rel}" in out and "resumed from step 3" in out, out
  _assert_trees_close(_params(resumed), good, atol=0)
  aside = os.path.join(wd, checkpoint.SET_ASIDE_DIR)
  assert "does not match the checksum" in open(os.path.join(aside, "6", "reason.txt")).read()
  assert checkpoint.saved_steps(wd) == [3, 6]

  # --restore_step=3 moves the newer steps aside too and resumes from 3.
  again = sr_task.train(config, wd, devices=devices, write_report=False, restore_step=3)
  _assert_trees_close(_params(again), good, atol=0)
  assert sorted(os.listdir(aside)) == ["6", "6.1"]
  with pytest.raises(ValueError, match=r"--restore_step=4: no such checkpoint .*steps: 3, 6\)"):
    sr_task.train(config, wd, devices=devices, write_report=False, restore_step=4)


def test_a_rejected_resume_leaves_the_run_as_it_was(config, tmp_path):
  devices, wd = jax.devices()[:1], str(tmp_path)
  sr_task.train(config, wd, devices=devices, stop_at=3, write_report=False)
  saved_config = open(checkpoint.config_path(wd)).read()
  config.seed = 1  # another random stream and input order: not the same run
  with pytest.raises(ValueError, match="config field seed is 0 in the saved run but 1 now; use a "
                     "new --workdir or the saved config"):
    sr_task.train(config, wd, devices=devices, write_report=False)
  assert open(checkpoint.config_path(wd)).read() == saved_config
  assert checkpoint.saved_steps(wd) == [3]

  # Arrays that do not fit although the files are intact: the advice is about the config.
  other = small_config(**{"model.width": 32})
  ckpt = checkpoint.Checkpointer(wd, create=False)
  with pytest.raises(checkpoint.CheckpointError) as err:
    ckpt.restore(3, System.from_config(other, devices).abstract_with_shardings())
  ckpt.close()
  msg = str(err.value)
  assert not isinstance(err.value, checkpoint.CorruptCheckpoint)
  assert "files are intact" in msg and "config.json or a new --workdir" in msg, msg
  assert "corrupt" not in msg and len(msg.splitlines()) == 1


def test_a_failed_first_start_does_not_lock_the_workdir(config, tmp_path):
  devices, wd = jax.devices()[:1], str(tmp_path)
  bad = small_config(**{"vq.params": str(tmp_path / "no_such.safetensors")})
  with pytest.raises(FileNotFoundError, match="config.vq.params=.*no such file"):
    sr_task.train(bad, wd, devices=devices, write_report=False)
  assert not os.path.exists(checkpoint.config_path(wd))
  # A start that got as far as writing its config but saved no checkpoint binds nothing either.
  checkpoint.save_config(wd, small_config(**{"model.width": 32}))
  state = sr_task.train(config, wd, devices=devices, stop_at=1, write_report=False)
  assert int(state.step) == 1
  assert checkpoint.load_config(wd).model.width == config.model.width


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
  r = _run("mmsr_jax.train", f"--workdir={tmp_path}/w", "--config.num_train_steps=-3")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: config.num_train_steps=-3: expected an integer >= 1"]
  assert not os.path.exists(tmp_path / "w")

  (tmp_path / "empty_run").mkdir()
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/empty_run", f"--input={bad}",
           f"--output={tmp_path}/out", "--max_pixels=100000")  # inputs are checked first
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


def test_sample_never_writes_over_its_inputs(tmp_path):
  """An output that is one of the inputs is refused, with --overwrite too."""
  checkpoint.save_config(str(tmp_path / "no_ckpt"), small_config())
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
  before = (inputs / "a.png").read_bytes()
  for extra in ((), ("--overwrite",)):
    r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/no_ckpt", f"--input={inputs}",
             f"--output={inputs}", *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"a.png would overwrite the input {inputs}/a.png" in r.stderr, r.stderr
  assert (inputs / "a.png").read_bytes() == before and os.listdir(inputs) == ["a.png"]


def _unwritable_folder() -> str:
  """A folder path that cannot be created here even as root (sysfs refuses new entries)."""
  path = "/sys/mmsr_test_unwritable"
  try:
    os.mkdir(path)
  except OSError:
    return path
  os.rmdir(path)
  pytest.skip("no unwritable folder on this machine")


def test_unwritable_workdir_and_output_are_one_clear_line(tmp_path):
  bad = _unwritable_folder()
  r = _run("mmsr_jax.train", f"--workdir={bad}/run", "--config.num_train_steps=1")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: ") and bad in r.stderr, r.stderr
  checkpoint.save_config(str(tmp_path / "run"), small_config())
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/run", f"--input={tmp_path}/a.png",
           f"--output={bad}/out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith(f"error: --output={bad}/out: /sys cannot be written ("), r.stderr


def test_condition_dropout_selects_the_null_blocks(config):
  """With modality dropout 1 every map is replaced by its null block, so the maps no longer
  change the loss; with dropout 0 they do."""
  batch = next(iter(sr_examples.make_train_loader(config, make_tokenizer("byte"))))
  changed = dict(batch, edge=-batch["edge"], depth=np.ones_like(batch["depth"]),
                 present=np.ones_like(batch["present"]))
  losses = {}
  config.cond_dropout.all = config.cond_dropout.all_modalities = 0.0  # only the per-map drops
  for p in (1.0, 0.0):
    config.cond_dropout.modality_total = p
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


def _empirical_drop_rates(cond_dropout, n=400_000):
  """Drop rates of ``sr_task.drop_conditions`` over ``n`` examples that have every map."""
  present, drop_text = jax.device_get(sr_task.drop_conditions(
      cond_dropout, jax.random.key(3), jnp.ones((n, 3), bool)))
  return present, drop_text


@pytest.mark.parametrize("rates", [
    dict(),  # the schema's defaults
    dict(text_total=0.3, modality_total=0.5, all=0.2, all_modalities=0.25)])
def test_each_condition_is_dropped_at_its_configured_total(config, rates):
  """Joint drops included, each caption and each map is dropped with ``text_total`` /
  ``modality_total`` (the independent drops used to add to the joint ones: 0.19 and 0.23 per
  condition for totals of 0.1); the joint drops still occur at their own rates."""
  cfg = config.cond_dropout
  cfg.update(rates)
  tasks.validate(config)
  n = 400_000
  present, drop_text = _empirical_drop_rates(cfg, n)
  dropped = ~present

  def within(measured, p, what):
    sigma = np.sqrt(p * (1 - p) / n)  # 5 sigma: about 1 false alarm in 1.7 million draws
    assert abs(measured - p) <= 5 * sigma + 1e-12, (what, measured, p)

  within(drop_text.mean(), cfg.text_total, "text")
  for m in range(3):
    within(dropped[:, m].mean(), cfg.modality_total, f"map {m}")
  # The joint drops: every condition at once at least as often as `all`, every map together
  # (caption kept or not) at least as often as the joint share of the maps.
  _, j_map = sr_schema.joint_drop_rates(cfg)
  assert (drop_text & dropped.all(1)).mean() >= cfg.all - 5 * np.sqrt(cfg.all / n)
  assert dropped.all(1).mean() >= j_map - 5 * np.sqrt(j_map / n)


def test_joint_drops_above_the_total_are_refused(config):
  """The joint drops alone may not drop a condition more often than its configured total."""
  config.cond_dropout.update(dict(modality_total=0.1, all=0.05, all_modalities=0.06))
  with pytest.raises(ValueError, match=r"config\.cond_dropout\.modality_total=0\.1: expected a "
                     r"total drop rate >= 0\.107.*config\.cond_dropout\.all\).*"
                     r"config\.cond_dropout\.all_modalities\)"):
    tasks.validate(config)
  config.cond_dropout.update(dict(modality_total=0.2, text_total=0.04))
  with pytest.raises(ValueError, match=r"config\.cond_dropout\.text_total=0\.04: expected a total "
                     r"drop rate >= 0\.05, .*\(config\.cond_dropout\.all\)"):
    tasks.validate(config)
  config.cond_dropout.text_total = 0.05  # equal to the joint share: independent rate 0
  tasks.validate(config)
  assert sr_schema.independent_drop_rates(config.cond_dropout)[0] == 0.0


def test_runs_saved_with_independent_rates_keep_their_drops():
  """A config saved when cond_dropout.text / .modality were the independent rates loads as the
  totals those draws give, so sampling and resuming it see the same drops."""
  old = {"cond_dropout": {"modality": 0.1, "text": 0.1, "all": 0.1, "all_modalities": 0.05}}
  cfg = tasks.with_defaults(old).cond_dropout
  assert set(cfg) == {"modality_total", "text_total", "all", "all_modalities"}
  np.testing.assert_allclose([cfg.text_total, cfg.modality_total], [0.19, 0.2305], atol=1e-12)
  np.testing.assert_allclose(sr_schema.independent_drop_rates(cfg), [0.1, 0.1], atol=1e-12)


def test_zero_snr_needs_trailing_spacing(config, tmp_path):
  """Zero terminal SNR with leading spacing would start sampling at t = 981, not T - 1: the
  config check refuses it (train and a saved run's sample), trailing passes."""
  config.diffusion.prediction = "v"
  config.diffusion.rescale_zero_snr = True
  config.sampling.spacing = "leading"
  message = ("config.sampling.spacing='leading': expected 'trailing' when "
             "config.diffusion.rescale_zero_snr=True")
  with pytest.raises(ValueError, match=re.escape(message)):
    tasks.validate(config)
  r = _run("mmsr_jax.train", f"--workdir={tmp_path}/w", "--config.diffusion.prediction=v",
           "--config.diffusion.rescale_zero_snr=True", "--config.sampling.spacing=leading")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: " + message), r.stderr
  assert not os.path.exists(tmp_path / "w")
  checkpoint.save_config(str(tmp_path / "run"), config)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  r = _run("mmsr_jax.sample", f"--workdir={tmp_path}/run", f"--input={tmp_path}/a.png",
           f"--output={tmp_path}/out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert message in r.stderr, r.stderr
  config.sampling.spacing = "trailing"
  tasks.validate(config)
