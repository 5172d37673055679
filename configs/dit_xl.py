"""MMSR with a DiT-XL denoiser (28 blocks x 1152, 16 heads), started from PixArt-alpha XL-2 512.

  python -m mmsr_jax.convert --kind=pixart --src=PixArt-alpha/PixArt-XL-2-512x512 \
      --dst=weights/pixart_xl_2_512
  python -m mmsr_jax.train --config=configs/dit_xl.py --workdir=gs://BUCKET/runs/dit_xl

The shared research settings are ``mmsr_jax.config.sr.full_size_config``.
"""

from mmsr_jax.config.sr import full_size_config


def get_config():
  return full_size_config(width=1152, depth=28, num_heads=16, lr=2e-5,
                          init_from="weights/pixart_xl_2_512")
