r"""Trains the VQGAN modality tokenizers:
``python -m mmsr_jax.train_vq --config=configs/vq_tiny.py --workdir=DIR``.

Resume is the default; ``DIR/vq.safetensors`` is the tokenizer for ``config.vq.params``.
"""

from mmsr_jax import cli
from mmsr_jax.training.vq_task import train

if __name__ == "__main__":
  cli.run_training(train, "configs/vq_tiny.py",
                   "Directory for checkpoints, logs, the report and vq.safetensors.")
