"""MMSR with a DiT-L denoiser (24 blocks x 1024, 16 heads).

  python -m mmsr_jax.train --config=configs/dit_l.py --workdir=gs://BUCKET/runs/dit_l

The shared research settings (VAE, T5, VQGAN tokenizers, MMLC, 512px crops, bf16) are in
``mmsr_jax.config_base.full_size_config``; override any field on the command line, e.g.
``--config.vq.params=/ckpt/vq.safetensors --config.batch_size=64``.
"""

from mmsr_jax.config.base import full_size_config


def get_config():
  return full_size_config(width=1024, depth=24, num_heads=16, lr=1e-4)
