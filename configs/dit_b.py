"""MMSR with a DiT-B denoiser (12 blocks x 768, 12 heads).

  python -m mmsr_jax.train --config=configs/dit_b.py --workdir=gs://BUCKET/runs/dit_b

The shared research settings are ``mmsr_jax.schema.sr.full_size_config``.
"""

from mmsr_jax.schema.sr import full_size_config


def get_config():
  return full_size_config(width=768, depth=12, num_heads=12, lr=2e-4)
