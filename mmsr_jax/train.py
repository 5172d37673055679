r"""Trains MMSR: ``python -m mmsr_jax.train --config=configs/tiny.py --workdir=DIR``.

Resume is the default: a workdir holding checkpoints continues from the newest one.
"""

from mmsr_jax import cli
from mmsr_jax.training.sr_task import train

if __name__ == "__main__":
  cli.run_training(train, "configs/tiny.py", "Directory for checkpoints, logs and the report.")
