"""MMSR with a DiT-L denoiser (24 blocks x 1024, 16 heads).

  python -m mmsr_jax.train --config=configs/dit_l.py --workdir=gs://BUCKET/runs/dit_l

The shared research settings are ``mmsr_jax.schema.sr.full_size_config``.
"""

from mmsr_jax.schema.sr import full_size_config


def get_config():
  return full_size_config(width=1024, depth=24, num_heads=16, lr=1e-4)
