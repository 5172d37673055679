"""One writer per workdir, and writes that fail loudly: the workdir lock between real processes
(refusal naming the holder, a killed holder's lock taken over), folders checked writable before
the build, a save that fails mid-run ending the run with one line, resume past an empty step,
metrics.jsonl cut back to the resumed step, and a log line per saved checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from mmsr_jax.runtime import checkpoint
from mmsr_jax.runtime import workdir as workdir_lib
from mmsr_jax.training import loop, sr_task
from tests.conftest import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fields small_config() changes, as the trainer's command-line overrides.
SMALL = ["--config.batch_size=8", "--config.num_train_steps=6", "--config.log_every=2",
         "--config.checkpoint_every=3", "--config.optimizer.warmup_steps=2",
         "--config.data.hr_size=32", "--config.data.eval_size=32", "--config.data.map_size=16",
         "--config.text.max_length=16", "--config.model.width=64", "--config.model.depth=2",
         "--config.model.num_heads=4", "--config.model.context_latents=8",
         "--config.model.context_heads=4", "--config.eval.steps=2",
         "--config.eval.val_batches=1"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _train(workdir, *extra, timeout=240):
  return subprocess.run([sys.executable, "-m", "mmsr_jax.train", "--config=configs/tiny.py",
                         f"--workdir={workdir}", *SMALL, *extra], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _started(args):
  """A process that is ended (killed) when the block ends, pass or fail."""
  proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.communicate(timeout=60)


def _wait_for_lock(path: str, proc, seconds: float = 120) -> dict:
  deadline = time.time() + seconds
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0]
    if os.path.exists(path) and open(path).read().strip():
      return json.loads(open(path).read())
    time.sleep(0.2)
  raise AssertionError(f"{path} was not written in {seconds} s")


@contextlib.contextmanager
def _immutable(path: str):
  """``path`` made read-only for every user, root included (chmod does not stop root; the
  immutable attribute does). Skips the test where the attribute cannot be set."""
  r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True) if shutil.which(
      "chattr") else None
  if r is None or r.returncode != 0:
    pytest.skip("cannot make a read-only folder here: chattr +i is missing or not permitted "
                f"({r.stderr.strip() if r else 'no chattr'}); chmod alone does not stop root")
  try:
    yield path
  finally:
    subprocess.run(["chattr", "-i", path], check=True)


# --- The lock -----------------------------------------------------------------------------------
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
  wd = str(tmp_path / "run")
  lock = workdir_lib.lock_path(wd)
  with _started([sys.executable, "-m", "mmsr_jax.train", "--config=configs/tiny.py",
                 f"--workdir={wd}", *SMALL, "--config.num_train_steps=100000"]) as first:
    holder = _wait_for_lock(lock, first)
    assert holder["pid"] == first.pid and holder["what"] == "a training run"
    t0 = time.time()
    second = _train(wd)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: --workdir={wd} is in use by a training run on host {holder['host']}, pid "
        f"{first.pid}, started {holder['started']} ({lock}); one process writes a run at a "
        "time: wait for it to end or use another --workdir"]
    assert time.time() - t0 < 60  # refused at start, not after a compile
    # Killed: the kernel drops its flock, its record stays: stale, taken over with a warning.
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  said = []
  workdir_lib.acquire(wd, "a test", log=said.append)
  try:
    assert said == [f"warning: taking over the lock of a training run on host {holder['host']}, "
                    f"pid {holder['pid']}, started {holder['started']} ({lock}): that process "
                    "ended without releasing it"]
    assert json.loads(open(lock).read())["pid"] == os.getpid()
  finally:
    workdir_lib.release(wd)
  assert open(lock).read() == ""  # released: empty, so the next start warns of nothing


def test_a_sampler_writing_into_a_run_is_refused_while_it_trains(tmp_path):
  wd = str(tmp_path / "run")
  checkpoint.save_config(wd, small_config())
  from PIL import Image
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import time
      from mmsr_jax.runtime import workdir
      workdir.acquire({wd!r}, "a training run")
      print("held", flush=True)
      time.sleep(600)""")], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    r = subprocess.run([sys.executable, "-m", "mmsr_jax.sample", f"--workdir={wd}",
                        f"--input={tmp_path / 'a.png'}", f"--output={wd}/samples_out"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"error: --workdir={wd} is in use by a training run on host" in r.stderr
    assert f"pid {holder.pid}" in r.stderr
    assert not os.path.exists(f"{wd}/samples_out")
  finally:
    holder.kill()
    holder.wait(timeout=60)


# --- Writable folders ---------------------------------------------------------------------------
def test_read_only_checkpoints_or_workdir_fail_before_the_build(tmp_path):
  wd = tmp_path / "run"
  (wd / "checkpoints").mkdir(parents=True)
  with _immutable(str(wd / "checkpoints")):
    r = _train(wd, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      f"error: --workdir={wd}: {wd}/checkpoints cannot be written (Operation not permitted)"]
  with _immutable(str(wd)):
    r = _train(wd, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      f"error: --workdir={wd}: {wd} cannot be written (Operation not permitted)"]


_FREEZE_AT_STEP_2 = """
import os, subprocess, sys
from tests.conftest import small_config
from mmsr_jax import cli
from mmsr_jax.training import loop, sr_task

def main(argv):
  wd = os.environ["MMSR_TEST_WORKDIR"]
  config = small_config()
  loop.check_workdir(config, wd)
  task = sr_task.SRTask(config, wd)
  step = task.step

  def step_then_freeze(state, batch):
    out = step(state, batch)
    if int(out[0].step) == 2:  # the disk turns read-only before the first save (step 3)
      subprocess.run(["chattr", "+i", os.path.join(wd, "checkpoints")], check=True)
    return out
  task.step = step_then_freeze
  loop.run(task, wd, write_report=False)

cli.run(main)
"""


def test_a_save_that_fails_mid_run_ends_it_with_one_line(tmp_path):
  wd = tmp_path / "run"
  (wd / "checkpoints").mkdir(parents=True)
  with _immutable(str(wd / "checkpoints")):  # skips where chattr cannot work
    pass
  try:
    r = subprocess.run([sys.executable, "-c", _FREEZE_AT_STEP_2], cwd=REPO, capture_output=True,
                       text=True, timeout=180, env=dict(_env(), MMSR_TEST_WORKDIR=str(wd)))
  finally:
    subprocess.run(["chattr", "-i", str(wd / "checkpoints")], check=True)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines() == [
      f"error: checkpoint 3 could not be saved to {wd}/checkpoints: process 0: {wd}/checkpoints "
      "cannot be written (Operation not permitted); the last saved checkpoint (none) is kept"]
  assert open(workdir_lib.lock_path(str(wd))).read() == ""  # the lock was released on the way


# --- Resume -------------------------------------------------------------------------------------
def test_resume_passes_an_empty_step_warns_of_a_missing_manifest_and_cuts_metrics(
    config, tmp_path, capsys):
  wd = str(tmp_path)
  devices = jax.devices()[:1]
  config.num_train_steps = 9
  sr_task.train(config, wd, devices=devices, stop_at=6, write_report=False)
  out = capsys.readouterr().out
  for step in (3, 6):  # every checkpoint is logged when committed
    assert f"saved checkpoint {step} to {wd}/checkpoints/{step}\n" in out, out
  # A run killed after logging step 8 and making the folder of step 9, before writing into it.
  with open(os.path.join(wd, loop.METRICS_FILE), "a") as f:
    f.write(json.dumps({"step": 8, "loss": 1.0}) + "\n")
  os.makedirs(os.path.join(wd, "checkpoints", "9"))
  # Step 6's manifest lost: restored, with a warning (step 3 has one).
  for m in os.listdir(os.path.join(wd, "checkpoints", "6")):
    if m.startswith(checkpoint.MANIFEST_PREFIX):
      os.remove(os.path.join(wd, "checkpoints", "6", m))
  capsys.readouterr()
  state = sr_task.train(config, wd, devices=devices, write_report=False)
  out = capsys.readouterr().out
  assert int(state.step) == 9
  assert ("checkpoints/9 is corrupt: it holds no saved items and no checksum manifest; trying "
          "the previous checkpoint") in out, out
  assert (f"warning: checkpoint {wd}/checkpoints/6 has no checksum manifest although step(s) 3 "
          "have one: its files cannot be checked") in out, out
  assert "resumed from step 6" in out
  assert os.listdir(os.path.join(wd, checkpoint.SET_ASIDE_DIR)) == ["9"]
  steps = [r["step"] for r in loop.read_metrics(wd)]
  assert steps == [2, 3, 4, 6, 8, 9], steps  # the 8 from before the resume is gone
