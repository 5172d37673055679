"""The PixArt-alpha style diffusion transformer (diffusers ``PixArtTransformer2DModel`` layout):
patch embedding of ``[z_t ++ LR latent]``, adaLN-single blocks of self-attention, cross-attention
to the context and a GELU MLP, modulated final layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsr_jax.models import layers


class TimestepEmbedder(nn.Module):
  """Sinusoidal features (256) -> Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

  width: int
  freq_dim: int = 256
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = layers.timestep_sinusoids(t, self.freq_dim).astype(self.dtype)
    x = layers.dense(self.width, (None, "embed"), name="linear_1", dtype=self.dtype)(x)
    x = nn.silu(x)
    return layers.dense(self.width, ("embed", "embed_out"), name="linear_2", dtype=self.dtype)(x)


class DiTBlock(nn.Module):
  """One PixArt block with adaLN-single modulation; ``(x, ...) -> (x, None)`` for ``nn.scan``."""

  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: layers.Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, t_mod, context, context_mask=None):
    table = layers.param_with_axes(
        self, "scale_shift_table",
        lambda key, shape: jax.random.normal(key, shape) / self.width ** 0.5,
        (6, self.width), (None, "embed"))
    mod = table[None].astype(self.dtype) + t_mod.reshape(-1, 6, self.width)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [
        mod[:, i][:, None] for i in range(6)]

    norm = lambda name: layers.layer_norm(name, affine=False, dtype=self.dtype)  # noqa: E731
    h = norm("norm1")(x) * (1 + scale_msa) + shift_msa
    attn = lambda name: layers.Attention(  # noqa: E731
        self.width, self.num_heads, self.dtype, implementation=self.attention, name=name)
    x = x + gate_msa * attn("attn1")(h)
    x = x + attn("attn2")(x, context, mask=context_mask)
    h = norm("norm2")(x) * (1 + scale_mlp) + shift_mlp
    hidden = int(self.width * self.mlp_ratio)
    x = x + gate_mlp * layers.Mlp(self.width, hidden, self.dtype, name="ff")(h)
    return layers.constrain_tokens(x), None


class DiT(nn.Module):
  """The denoiser. ``__call__(x, t, context) -> prediction`` with the same H, W as ``x``."""

  out_channels: int
  width: int
  depth: int
  num_heads: int
  patch_size: int = 2
  mlp_ratio: float = 4.0
  pos_base_size: int | None = None  # training grid (tokens per side); None = integer positions
  pos_interpolation_scale: float = 1.0
  # The context's last rows are this many per-place tokens (models/context.py, spatial_grid),
  # added to the patch tokens; the rest is cross-attended. 0: all of it is cross-attended.
  spatial_tokens: int = 0
  remat: str = "none"  # one of config.choices.REMAT
  dtype: layers.Dtype = jnp.float32
  attention: str = "xla"  # a resolved kernel (layers.resolve_attention)

  @nn.compact
  def __call__(self, x, t, context, context_mask=None):
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"DiT input {h}x{w} is not divisible by patch_size={p}")
    gh, gw = h // p, w // p

    tokens = nn.Conv(
        self.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed", dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(x.astype(self.dtype))
    pos = layers.sincos_2d(self.width, gh, gw, self.pos_base_size, self.pos_interpolation_scale)
    tokens = tokens.reshape(b, gh * gw, self.width) + jnp.asarray(pos, self.dtype)[None]
    context = context.astype(self.dtype)
    if self.spatial_tokens:
      if self.spatial_tokens != gh * gw:
        raise ValueError(f"the context carries {self.spatial_tokens} per-place tokens but the "
                         f"DiT input has {gh}x{gw} patches")
      tokens = tokens + context[:, -self.spatial_tokens:]
      context = context[:, :-self.spatial_tokens]
    tokens = layers.constrain_tokens(tokens)

    # adaLN-single: one shared projection of the timestep embedding to six modulations.
    t_emb = TimestepEmbedder(self.width, dtype=self.dtype, name="timestep_embedder")(t)
    t_mod = layers.dense(6 * self.width, ("embed", "embed_out"), name="adaln_single",
                         dtype=self.dtype, kernel_init=nn.initializers.zeros)(nn.silu(t_emb))

    blocks = layers.scan_blocks(DiTBlock, depth=self.depth, remat=self.remat, broadcast=3)
    tokens, _ = blocks(self.width, self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                       name="blocks")(tokens, t_mod, context, context_mask)

    table = layers.param_with_axes(
        self, "scale_shift_table",
        lambda key, shape: jax.random.normal(key, shape) / self.width ** 0.5,
        (2, self.width), (None, "embed"))
    mod = table[None].astype(self.dtype) + t_emb[:, None]  # [B, 2, D]
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    tokens = layers.layer_norm("norm_out", affine=False, dtype=self.dtype)(tokens)
    tokens = tokens * (1 + scale) + shift
    out = layers.dense(p * p * self.out_channels, ("embed", "conv_out"), name="proj_out",
                       dtype=self.dtype, kernel_init=nn.initializers.zeros)(tokens)
    # Unpatchify: [B, gh*gw, p*p*C] -> [B, H, W, C].
    out = out.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, self.out_channels).astype(jnp.float32)
