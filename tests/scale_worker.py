"""Subprocess side of ``tests/test_scale.py``: one training process of a multi-process or
preemption test, and :class:`Workers`, which starts such processes so that they end with the
test. Not collected by pytest (no ``test_`` prefix).

  python -m tests.scale_worker multiprocess WORKDIR OUT.npz       # env MMSR_COORDINATOR etc. set
  python -m tests.scale_worker slow WORKDIR OUT.npz               # one process, 0.2 s per step
  python -m tests.scale_worker slow_multiprocess WORKDIR OUT.npz  # both: SIGTERM in the middle
  python -m tests.scale_worker sleep - -                          # waits (lifetime test)
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT_ENV = "MMSR_TEST_PARENT_PID"


class Workers:
  """Starts ``python -m tests.scale_worker ...`` processes that end when the test does.

  Each worker runs in its own process group, killed when the ``with`` block ends (pass, fail or
  KeyboardInterrupt); a worker also ends itself when its parent dies, so a pytest killed with
  SIGKILL or SIGTERM leaves no orphan behind (see :func:`exit_with_parent`).
  """

  def __init__(self):
    self.procs: list[subprocess.Popen] = []

  def start(self, args, env, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.scale_worker", *map(str, args)],
                            cwd=REPO, env=dict(env, **{PARENT_ENV: str(os.getpid())}),
                            start_new_session=True, **kwargs)
    self.procs.append(proc)
    return proc

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      proc.wait()
      for f in (proc.stdout, proc.stderr):
        if f is not None:
          f.close()


def exit_with_parent() -> None:
  """Ends this process when the one that started it (``$MMSR_TEST_PARENT_PID``) dies: the
  kernel's parent-death signal on Linux, and a watchdog thread for other systems."""
  parent = int(os.environ.get(PARENT_ENV, "0") or 0)
  if not parent:
    return
  if sys.platform.startswith("linux"):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

  def orphaned() -> bool:
    return os.getppid() != parent

  if orphaned():  # the parent died before the signal was armed
    os._exit(3)

  def watch():
    while not orphaned():
      time.sleep(0.5)
    os._exit(3)
  threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def small_config(num_steps: int):
  """The test config of ``tests/conftest.py`` with the settings these runs share."""
  from tests.conftest import small_config as base
  c = base()
  c.num_train_steps = num_steps
  c.tensorboard = False
  return c


def save_params(params, path: str) -> None:
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


def main() -> None:
  exit_with_parent()
  mode, workdir, out = sys.argv[1:4]
  if mode == "sleep":
    print("ready", flush=True)
    time.sleep(600)
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mmsr_jax.runtime import distributed
  distributed.initialize()
  import jax

  from mmsr_jax.training import loop, sr_task

  class SlowTrainer(sr_task.SRTask):
    """Steps slow enough (0.2 s) for a test to send SIGTERM in the middle of a run."""

    def step(self, state, batch):
      time.sleep(0.2)
      return super().step(state, batch)

  if mode in ("multiprocess", "slow_multiprocess"):
    slow = mode == "slow_multiprocess"
    config = small_config(int(os.environ.get("STEPS", "8" if slow else "5")))
    config.mesh.data, config.mesh.fsdp = 2, 2
    if slow:
      config.log_every = 1
      config.checkpoint_every = 1000
    loop.check_workdir(config, workdir)
    state = loop.run((SlowTrainer if slow else sr_task.SRTask)(config, workdir), workdir,
                     write_report=False)
    # Every process takes part in the gather; process 0 writes the result.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
      save_params(params, out)
    print(f"process {jax.process_index()} finished at step {int(state.step)}", flush=True)
  elif mode == "slow":
    config = small_config(int(os.environ.get("STEPS", "12")))
    config.log_every = 1
    config.checkpoint_every = 1000
    loop.check_workdir(config, workdir)
    state = loop.run(SlowTrainer(config, workdir, jax.devices()[:1]), workdir,
                     write_report=False)
    save_params(state.params, out)
    print(f"finished at step {int(state.step)}", flush=True)
  else:
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
  main()
