"""MMSR with a DiT-B denoiser (12 blocks x 768, 12 heads).

  python -m mmsr_jax.train --config=configs/dit_b.py --workdir=gs://BUCKET/runs/dit_b

DiT-B. SD-compatible KL-f8 VAE, T5 text encoder (77 tokens), VQGAN f16 tokenizers
(256x256 maps -> 16x16 ids, codebook 1024 x 256) and a 128-latent MMLC, as in MMSR.md. The
frozen components are read from the paths below (written by ``python -m mmsr_jax.convert``);
point them at your converted weights, e.g. ``--config.vq.params=/ckpt/vq.safetensors``.
512x512 training crops from 128x128 LR.
"""

from mmsr_jax.config_base import base_config


def get_config():
  c = base_config()
  c.batch_size = 256
  c.num_train_steps = 200_000
  c.log_every = 100
  c.checkpoint_every = 2_000
  c.compute_dtype = "bfloat16"
  c.optimizer.lr = 2e-4
  c.optimizer.warmup_steps = 1_000
  c.optimizer.weight_decay = 0.03
  c.optimizer.ema_decay = 0.9999

  c.data.hr_size = 512
  c.data.map_size = 256
  c.data.eval_size = 512

  c.text.tokenizer = "google/t5-v1_1-xxl"
  c.text.max_length = 77
  c.text.params = "weights/t5_v1_1_xxl.safetensors"
  c.text.encoder = dict(
      vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")

  c.vq.params = "weights/vqgan_f16_modalities.safetensors"

  c.autoencoder.kind = "vae"
  c.autoencoder.factor = 8
  c.autoencoder.scaling_factor = 0.18215
  c.autoencoder.params = "weights/sd_vae_ft_ema.safetensors"

  c.model.width = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.patch_size = 2
  c.model.remat = True
  c.model.context_latents = 128
  c.model.context_depth = 2
  c.model.context_heads = 12
  c.model.init_from = ""

  c.sampling.steps = 50
  c.sampling.guidance = "mcfg"
  c.sampling.scale = 2.0
  return c
