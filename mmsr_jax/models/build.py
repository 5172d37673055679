"""Config -> modules: the one place that turns config fields into the project's Flax modules."""

from __future__ import annotations

import jax.numpy as jnp

from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models import layers
from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vae as vae_lib
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.models.conditioner import Conditioner
from mmsr_jax.models.mmsr import MMSR

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config):
  return DTYPES[config.compute_dtype]


def _as_dict(cfg) -> dict:
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def vq_arch(config, dtype: str = "float32") -> vqgan_lib.VQGANConfig:
  """The VQGAN tokenizer architecture of ``config.vq.arch`` computing in ``dtype``."""
  return vqgan_lib.VQGANConfig(**_as_dict(config.vq.arch), dtype=dtype)


def autoencoder(cfg, dtype: str = "float32"):
  """The autoencoder that ``config.autoencoder`` (``cfg``) names, computing in ``dtype``."""
  if cfg.kind == "pixel":
    return ae_lib.PixelAutoencoder(factor=cfg.factor, scaling_factor=cfg.scaling_factor)
  shift = cfg.get("shift_factor", None)
  return ae_lib.KLAutoencoder(vae_lib.VAEConfig(**dict(
      _as_dict(cfg.get("arch", None)), scaling_factor=float(cfg.scaling_factor),
      shift_factor=None if shift is None else float(shift), dtype=dtype)))


def text_encoder(config, dtype: str = "float32") -> t5_lib.T5Encoder:
  return t5_lib.T5Encoder(t5_lib.T5Config(**_as_dict(config.text.encoder), dtype=dtype))


def conditioner(config) -> Conditioner:
  """The frozen encoders, computing in the run's dtype (their weights keep their own)."""
  dt = config.compute_dtype
  return Conditioner(
      autoencoder=autoencoder(config.autoencoder, dt), text_encoder=text_encoder(config, dt),
      vq=vqgan_lib.VQGAN(vq_arch(config, dt)), scale=config.data.scale,
      residual=config.diffusion.residual, residual_scale=config.diffusion.residual_scale,
      vq_per_modality=bool(config.vq.per_modality), ids_from=config.vq.ids_from,
      text_len=config.text.max_length, map_size=config.data.map_size,
      encode_passes=int(config.get("encode_passes", 1)))


def mmsr(config, platform: str | None = None) -> MMSR:
  """The trainable model (context connector + DiT) for devices of ``platform`` (default: this
  process's backend; the platform decides what ``config.model.attention='auto'`` means)."""
  mc = config.model
  latent = config.data.hr_size // config.autoencoder.factor
  grid = config.data.map_size // vq_arch(config).downsample_factor
  return MMSR(
      latent_channels=autoencoder(config.autoencoder).latent_channels, width=mc.width, depth=mc.depth,
      num_heads=mc.num_heads, patch_size=mc.patch_size, mlp_ratio=mc.mlp_ratio,
      pos_base_size=latent // mc.patch_size,
      pos_interpolation_scale=float(mc.get("pos_interpolation_scale", 1.0)),
      codebook_size=config.vq.arch.num_vq_embeddings,
      token_grid=(grid, grid), context_latents=mc.context_latents,
      context_depth=mc.context_depth, context_heads=mc.context_heads,
      context_latent_positions=bool(mc.get("context_latent_positions", False)),
      context_spatial_grid=latent // mc.patch_size if mc.get("context_spatial", False) else 0,
      remat={True: "full", False: "none"}.get(mc.remat, mc.remat), dtype=compute_dtype(config),
      attention=attention(config, platform))


def attention(config, platform: str | None = None) -> str:
  """The attention kernel ``config.model.attention`` resolves to on ``platform``'s devices."""
  return layers.resolve_attention(config.model.get("attention", "xla"), compute_dtype(config),
                                  platform)
