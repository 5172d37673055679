"""Test set-up: 8 fake CPU devices (set before JAX is imported) and small configs."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_cache_dir(pid: int) -> str:
  return os.path.join(tempfile.gettempdir(), f"mmsr_jax_test_xla_cache_{pid}")


# One persistent XLA compilation cache for the test session (the xdist workers of one run share
# their controller's), inherited by the commands the tests start: the CLI tests compile the same
# tiny programs in many processes. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _owner = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_cache_dir(_owner)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402
from mmsr_jax.training import sr_task


def small_config(**overrides):
  """The tiny config shrunk further so that a train step compiles and runs in seconds."""
  from configs import tiny
  c = tiny.get_config()
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.optimizer.warmup_steps = 2
  c.data.hr_size = 32
  c.data.eval_size = 32
  c.data.map_size = 16
  c.text.max_length = 16
  c.model.width = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.context_latents = 8
  c.model.context_heads = 4
  c.eval.steps = 2
  c.eval.val_batches = 1
  return apply_overrides(c, overrides)


def apply_overrides(cfg, overrides: dict):
  """Sets dotted fields (``{"data.hr_size": 32}``) on a ConfigDict; returns it."""
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture
def config():
  return small_config()


def perturbed(params, seed: int, scale: float = 0.02):
  """``params`` plus Gaussian noise of std ``scale`` on every leaf, each leaf keeping its
  sharding. The noise comes from NumPy: XLA would compile a threefry program per leaf shape
  (op by op) or one slow program for the whole tree (under jit)."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)

  def one(p):
    noise = rng.standard_normal(p.shape).astype(p.dtype) * np.asarray(scale, p.dtype)
    return jax.device_put(np.asarray(p) + noise, p.sharding)
  return jax.tree.map(one, params)


def save_random_run(path: str, config, *, devices, seed: int):
  """A run folder holding a real checkpoint (step 1) of random, perturbed (non-zero) weights.

  Returns ``(trainer, state)`` so that callers can build a sampler without restoring again.
  """
  from mmsr_jax.runtime import checkpoint as ckpt_lib
  trainer = sr_task.SRTask(config, path, devices=devices)
  state = trainer.init_state()
  params = perturbed(state.params, seed)
  state = state.replace(params=params, ema_params=params)
  ckpt_lib.save_config(path, config)
  ckpt = ckpt_lib.Checkpointer(path)
  ckpt.save(1, state, force=True)
  ckpt.wait()
  ckpt.close()
  return trainer, state


def pytest_sessionfinish(session):
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a run without xdist)
    shutil.rmtree(_session_cache_dir(os.getpid()), ignore_errors=True)
