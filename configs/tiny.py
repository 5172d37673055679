"""Tiny CPU demo: trains a small MMSR on the built-in demo photos in a few minutes.

  python -m mmsr_jax.train --config=configs/tiny.py --workdir=runs/tiny

Measured on a 2-core CPU with the trained tokenizer below: 7.5 to 8 minutes including
compilation when the machine is otherwise idle (13.5 minutes while the test suite ran beside it);
report.json with first_train_loss 0.966 -> final_train_loss 0.117, and on the two held-out 128x128
crops psnr_sr 27.68 / ssim_sr 0.676 against psnr_bicubic 28.01 / ssim_bicubic 0.711 (the same to
two decimals as with a random VQ: at this size the modalities barely move the result, val_loss
0.0826 with them and 0.0827 with every modality null).
Space-to-depth ("pixel") autoencoder, a 4-block width-192 DiT, random frozen T5; the VQ tokenizer
is mmsr_jax/assets/vq_tiny.safetensors, trained by ``python -m mmsr_jax.train_vq
--config=configs/vq_tiny.py``.
Override any field, e.g. ``--config.num_train_steps=30``. Real data and degradations:
``--config.data.source=folder --config.data.path=DIR --config.data.degradation=realesrgan``
(or ``source=tfds`` / ``arrayrecord``; see mmsr_jax/data/sources.py).
"""

import os

import mmsr_jax
from mmsr_jax.config.base import base_config

# The tokenizer trained by configs/vq_tiny.py (README: "VQ tokenizers"), shipped with the package.
VQ_TINY = os.path.join(os.path.dirname(mmsr_jax.__file__), "assets", "vq_tiny.safetensors")


def get_config():
  c = base_config()
  c.batch_size = 16
  c.num_train_steps = 1500
  c.log_every = 50
  c.checkpoint_every = 500
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.ema_decay = 0.995

  c.data.hr_size = 64
  c.data.map_size = 32
  c.data.eval_size = 128

  c.text.max_length = 32

  c.vq.arch.block_out_channels = (16, 32, 32)  # f4: 32x32 maps -> 8x8 ids
  c.vq.arch.layers_per_block = 1
  c.vq.arch.latent_channels = 16
  c.vq.arch.vq_embed_dim = 16
  c.vq.arch.num_vq_embeddings = 64
  c.vq.arch.norm_num_groups = 8
  c.vq.params = VQ_TINY

  c.autoencoder.kind = "pixel"
  c.autoencoder.factor = 4
  c.autoencoder.scaling_factor = 1.0

  c.model.width = 192
  c.model.depth = 4
  c.model.num_heads = 6
  c.model.patch_size = 2
  c.model.context_latents = 16
  c.model.context_depth = 1
  c.model.context_heads = 4

  # Residual diffusion on 4 * (HR - bicubic LR), epsilon prediction, SD's scaled-linear betas.
  c.diffusion.residual = True
  c.diffusion.residual_scale = 4.0
  c.diffusion.prediction = "epsilon"

  # Fidelity-first sampling: start from the upsampled LR noised to t = 0.2 T, 10 DDIM steps.
  c.sampling.steps = 10
  c.sampling.strength = 0.2
  c.sampling.clip_x0 = 8.0  # the residual's valid range: 4 * 2
  c.eval.steps = 10
  return c
