"""Subprocess side of ``tests/test_scale.py``: one training process of a multi-process or
preemption test. Not collected by pytest (no ``test_`` prefix).

  python -m tests.scale_worker multiprocess WORKDIR OUT.npz  # env MMSR_COORDINATOR etc. set
  python -m tests.scale_worker slow WORKDIR OUT.npz          # one process, 0.2 s per step
"""

import os
import sys
import time

import numpy as np
from mmsr_jax.training import sr_task


def small_config(num_steps: int):
  """The test config of ``tests/conftest.py`` with the settings these runs share."""
  from tests.conftest import small_config as base
  c = base()
  c.num_train_steps = num_steps
  c.tensorboard = False
  return c


def save_params(state, path: str) -> None:
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
  np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


def main() -> None:
  mode, workdir, out = sys.argv[1:4]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mmsr_jax.runtime import distributed
  distributed.initialize()
  import jax

  from mmsr_jax.training import loop
  if mode == "multiprocess":
    config = small_config(5)
    config.mesh.data, config.mesh.fsdp = 2, 2
    state = sr_task.train(config, workdir, write_report=False)
    # Every process takes part in the gather; process 0 writes the result.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
      leaves = jax.tree_util.tree_leaves_with_path(params)
      np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
  elif mode == "slow":
    # A run slow enough (0.2 s per step) for the test to send SIGTERM in the middle of it.
    config = small_config(int(os.environ.get("STEPS", "12")))
    config.log_every = 1
    config.checkpoint_every = 1000

    class SlowTrainer(sr_task.SRTask):
      def step(self, state, batch):
        time.sleep(0.2)
        return super().step(state, batch)

    loop.check_workdir(config, workdir)
    state = loop.run(SlowTrainer(config, workdir, jax.devices()[:1]), workdir,
                     write_report=False)
    save_params(state, out)
    print(f"finished at step {int(state.step)}", flush=True)
  else:
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
  main()
