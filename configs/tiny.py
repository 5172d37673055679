"""Tiny CPU demo: a small MMSR trained on the built-in demo photos in minutes.

  python -m mmsr_jax.train --config=configs/tiny.py --workdir=runs/tiny

Space-to-depth autoencoder, a 4-block width-192 DiT, a random frozen T5, and the VQ tokenizer
trained by ``configs/vq_tiny.py`` (shipped in ``mmsr_jax/assets``). Residual diffusion with
fidelity-first sampling; docs/tiny_demo.md gives the reasons and the measured result.
"""

import os

import mmsr_jax
from mmsr_jax.schema.sr import sr_config

VQ_TINY = os.path.join(os.path.dirname(mmsr_jax.__file__), "assets", "vq_tiny.safetensors")


def get_config():
  c = sr_config()
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
  # Every map made by fixed image operators from the degraded LR, so every example has all four
  # groups (the demo photos have almost no depth / seg); maps_from='hr' is the oracle experiment.
  c.data.maps_from = "lr"

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

  # Fidelity-first sampling: start from the upsampled LR noised to t = 0.2 T = 200 and take
  # 0.2 * 10 = 2 DDIM steps (the step size of a 10-step grid).
  c.sampling.steps = 10
  c.sampling.strength = 0.2
  c.sampling.clip_x0 = 8.0  # the residual's valid range: 4 * 2
  c.eval.steps = 10
  c.eval.sample_ablation = True  # PSNR / SSIM with each group nulled (cheap at this size)
  return c
