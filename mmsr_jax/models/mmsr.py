"""The trainable MMSR model: ``encode_context`` (modality tokens + MMLC; independent of the
timestep, so the sampler runs it once per image) and ``denoise`` (the DiT on
``[z_t ++ LR latent]``)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmsr_jax.models import context as context_lib
from mmsr_jax.models import dit as dit_lib


class MMSR(nn.Module):
  """The trainable part: multimodal context connector and the DiT denoiser."""

  latent_channels: int
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float
  pos_base_size: int
  codebook_size: int
  token_grid: tuple[int, int]
  context_latents: int
  context_depth: int
  context_heads: int
  context_latent_positions: bool = False
  context_spatial_grid: int = 0  # > 0: the per-place map path (models/context.py)
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  pos_interpolation_scale: float = 1.0  # PixArt's interpolation_scale

  def setup(self):
    self.context = context_lib.MultimodalContext(
        width=self.width, codebook_size=self.codebook_size, token_grid=self.token_grid,
        num_latents=self.context_latents, latent_positions=self.context_latent_positions,
        spatial_grid=self.context_spatial_grid, depth=self.context_depth,
        num_heads=self.context_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
        attention=self.attention)
    self.dit = dit_lib.DiT(
        out_channels=self.latent_channels, width=self.width, depth=self.depth,
        num_heads=self.num_heads, patch_size=self.patch_size, mlp_ratio=self.mlp_ratio,
        pos_base_size=self.pos_base_size, pos_interpolation_scale=self.pos_interpolation_scale,
        spatial_tokens=self.context_spatial_grid ** 2, remat=self.remat, dtype=self.dtype,
        attention=self.attention)

  def encode_context(self, text_states, text_mask, ids, present, temperature=None):
    return self.context(text_states, text_mask, ids, present, temperature)

  def denoise(self, z_t, t, lr_latent, context):
    return self.dit(jnp.concatenate([z_t, lr_latent.astype(z_t.dtype)], axis=-1), t, context)

  def __call__(self, z_t, t, lr_latent, text_states, text_mask, ids, present, temperature=None):
    return self.denoise(z_t, t, lr_latent,
                        self.encode_context(text_states, text_mask, ids, present, temperature))
