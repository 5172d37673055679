"""MMSR with a DiT-B denoiser (12 blocks x 768, 12 heads).

  python -m mmsr_jax.train --config=configs/dit_b.py --workdir=gs://BUCKET/runs/dit_b

The shared research settings (VAE, T5, VQGAN tokenizers, MMLC, 512px crops, bf16) are in
``mmsr_jax.config_base.full_size_config``; override any field on the command line, e.g.
``--config.vq.params=/ckpt/vq.safetensors --config.batch_size=64``.
"""

from mmsr_jax.config.base import full_size_config


def get_config():
  return full_size_config(width=768, depth=12, num_heads=12, lr=2e-4)
