"""The multimodal context: caption states and per-modality VQ token embeddings (with learned null
blocks for missing modalities) compressed by the Multimodal Latent Connector into the DiT's
cross-attention context. Per-group temperature scales that group's keys (``K / delta``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.models import layers



def latent_grid_positions(width: int, num_latents: int, gh: int, gw: int) -> np.ndarray:
  """``[num_latents, width]`` sin-cos positions of a g x g grid of latents (g * g =
  ``num_latents``), each at its cell's centre in the ``gh x gw`` map grid's integer units, so a
  latent and the map tokens under it carry near positions."""
  g = math.isqrt(num_latents)
  if g * g != num_latents:
    raise ValueError(f"latent positions need a square number of latents, got {num_latents}")
  cy = (np.arange(g) + 0.5) * gh / g - 0.5
  cx = (np.arange(g) + 0.5) * gw / g - 0.5
  yy, xx = np.meshgrid(cy, cx, indexing="ij")
  return np.concatenate([layers.sincos_1d(width // 2, xx), layers.sincos_1d(width // 2, yy)],
                        axis=1).astype(np.float32)


class ConnectorBlock(nn.Module):
  """Latents cross-attend to the context, then self-attend, then an MLP (pre-norm residuals)."""

  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: layers.Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, latents, context, context_mask, key_scale):
    ln = lambda name: layers.layer_norm(name, dtype=self.dtype)  # noqa: E731
    attn = lambda name: layers.Attention(  # noqa: E731
        self.width, self.num_heads, self.dtype, implementation=self.attention, name=name)
    latents = latents + attn("cross_attn")(ln("norm_cross")(latents), context,
                                           mask=context_mask, key_scale=key_scale)
    latents = latents + attn("self_attn")(ln("norm_self")(latents))
    hidden = int(self.width * self.mlp_ratio)
    latents = latents + layers.Mlp(self.width, hidden, self.dtype, name="mlp")(
        ln("norm_mlp")(latents))
    return layers.constrain_tokens(latents), None


class MultimodalContext(nn.Module):
  """Builds the 845-token (for the paper's sizes) multimodal context and compresses it to latents."""

  width: int
  codebook_size: int
  token_grid: tuple[int, int]  # VQ ids per map, (h, w)
  num_latents: int = 128
  # Add to latent k of a g x g grid (g * g = num_latents) the sin-cos position of its cell's
  # centre on the map grid, so latents start out tied to places (the paper's are free).
  latent_positions: bool = False
  # > 0: also pool each place's map tokens onto the denoiser's token grid (this many tokens per
  # side) and append them to the output, for the DiT to add to its tokens (the paper has no such
  # path: there the maps reach the DiT only through the latents' cross-attention).
  spatial_grid: int = 0
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  dtype: layers.Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, text_states, text_mask, ids, present, temperature=None):
    """Returns the ``[B, num_latents, width]`` context (``[B, num_latents + spatial_grid ** 2,
    width]`` with the spatial path: its last rows are the per-place map tokens).

    Args:
      text_states: ``[B, L, D_text]`` frozen text-encoder states.
      text_mask: ``[B, L]``, 1 for real tokens.
      ids: ``[B, 3, h, w]`` int VQ ids of depth, seg, edge.
      present: ``[B, 3]`` bool; False selects the modality's null block.
      temperature: ``None`` or ``[B, 4]`` per-group temperature (text, depth, seg, edge).
    """
    b = text_states.shape[0]
    gh, gw = self.token_grid
    if ids.shape[1:] != (len(MODALITIES), gh, gw):
      raise ValueError(f"modality ids have shape {ids.shape}, expected [B, 3, {gh}, {gw}]")
    n = gh * gw
    type_embed = layers.param_with_axes(
        self, "type_embed", nn.initializers.normal(0.02), (len(CONTEXT_GROUPS), self.width),
        (None, "embed"))

    # Text: PixArt-style caption projection (Linear -> GELU(tanh) -> Linear).
    txt = layers.dense(self.width, (None, "embed"), name="caption_projection_1",
                       dtype=self.dtype)(text_states.astype(self.dtype))
    txt = nn.gelu(txt, approximate=True)
    txt = layers.dense(self.width, ("embed", "embed_out"), name="caption_projection_2",
                       dtype=self.dtype)(txt)
    blocks = [txt + type_embed[0]]
    masks = [text_mask.astype(bool)]

    pos = jnp.asarray(layers.sincos_2d(self.width, gh, gw), self.dtype)
    for m, name in enumerate(MODALITIES):
      # Unit-variance codes, like the sin-cos positions they are added to (entries of RMS 0.7):
      # codes of std 0.02 vanish beside them, so at the start the connector saw only where a
      # token is, not which code it holds, and short runs learned no use of the maps
      # (docs/model.md, "Context carries information").
      embed = nn.Embed(
          self.codebook_size, self.width, name=f"{name}_embed", dtype=self.dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      ("vocab", "embed")))
      tok = embed(ids[:, m].reshape(b, n)) + type_embed[1 + m] + pos[None]
      null = layers.param_with_axes(self, f"{name}_null", nn.initializers.normal(0.02),
                                    (n, self.width), ("tokens", "embed"))
      tok = jnp.where(present[:, m, None, None], tok, null[None].astype(self.dtype))
      blocks.append(tok)
      masks.append(jnp.ones((b, n), bool))
    spatial = self._spatial(blocks[1:], gh, gw) if self.spatial_grid else None
    context = jnp.concatenate(blocks, axis=1)
    context_mask = jnp.concatenate(masks, axis=1)

    key_scale = None
    if temperature is not None:
      sizes = [text_states.shape[1]] + [n] * len(MODALITIES)
      key_scale = jnp.concatenate(
          [jnp.broadcast_to(1.0 / temperature[:, g, None], (b, s)) for g, s in enumerate(sizes)],
          axis=1)

    context = layers.constrain_tokens(layers.layer_norm("context_norm", dtype=self.dtype)(context))
    latents = layers.param_with_axes(self, "latents", nn.initializers.normal(0.02),
                                     (self.num_latents, self.width), ("latents", "embed"))
    if self.latent_positions:
      latents = latents + jnp.asarray(latent_grid_positions(self.width, self.num_latents, gh, gw),
                                      latents.dtype)
    x = jnp.broadcast_to(latents[None].astype(self.dtype), (b, self.num_latents, self.width))
    blocks = layers.scan_blocks(ConnectorBlock, depth=self.depth, broadcast=3)
    x, _ = blocks(self.width, self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                  name="blocks")(x, context, context_mask, key_scale)
    x = layers.layer_norm("norm_out", dtype=self.dtype)(x)
    return x if spatial is None else jnp.concatenate([x, spatial], axis=1)

  def _spatial(self, map_tokens, gh, gw):
    """``[B, g * g, width]``: the modalities' tokens summed per place, averaged over each
    denoiser token's cell, normalised and projected (zero-initialised, so the path starts
    silent)."""
    g = self.spatial_grid
    if gh % g or gw % g:
      raise ValueError(f"the {gh}x{gw} map token grid does not pool onto the denoiser's "
                       f"{g}x{g} token grid")
    b = map_tokens[0].shape[0]
    x = sum(map_tokens).reshape(b, g, gh // g, g, gw // g, self.width).mean(axis=(2, 4))
    x = layers.layer_norm("spatial_norm", dtype=self.dtype)(x.reshape(b, g * g, self.width))
    return layers.dense(self.width, ("embed", "embed_out"), name="spatial_proj", dtype=self.dtype,
                        kernel_init=nn.initializers.zeros)(x)
