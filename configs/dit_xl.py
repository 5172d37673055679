"""MMSR with a DiT-XL denoiser (28 blocks x 1152, 16 heads), started from PixArt-alpha XL-2 512.

  python -m mmsr_jax.convert --kind=pixart --src=PixArt-alpha/PixArt-XL-2-512x512 \
      --dst=weights/pixart_xl_2_512
  python -m mmsr_jax.train --config=configs/dit_xl.py --workdir=gs://BUCKET/runs/dit_xl

The shared research settings are ``mmsr_jax.schema.sr.full_size_config``. The noise schedule is
the one PixArt-alpha was trained with (linear betas 1e-4 -> 0.02, epsilon), which the converter
records in the converted folder; the trainer refuses a config whose betas differ from it.
"""

from mmsr_jax.schema.sr import full_size_config


def get_config():
  c = full_size_config(width=1152, depth=28, num_heads=16, lr=2e-5,
                       init_from="weights/pixart_xl_2_512")
  c.diffusion.schedule = "linear"
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  return c
