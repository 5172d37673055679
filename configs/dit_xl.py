"""MMSR with a DiT-XL denoiser (28 blocks x 1152, 16 heads): the PixArt-alpha size.

  python -m mmsr_jax.train --config=configs/dit_xl.py --workdir=gs://BUCKET/runs/dit_xl

Initialised from PixArt-alpha XL-2 512px weights (``config.model.init_from``), converted with
``python -m mmsr_jax.convert --kind=pixart --src=PixArt-alpha/PixArt-XL-2-512x512
--dst=weights/pixart_xl_2_512``.
The shared research settings (VAE, T5, VQGAN tokenizers, MMLC, 512px crops, bf16) are in
``mmsr_jax.config_base.full_size_config``; override any field on the command line, e.g.
``--config.vq.params=/ckpt/vq.safetensors --config.batch_size=64``.
"""

from mmsr_jax.config.base import full_size_config


def get_config():
  return full_size_config(width=1152, depth=28, num_heads=16, lr=2e-5,
                          init_from="weights/pixart_xl_2_512")
