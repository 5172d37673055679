"""The VQGAN tokenizer (taming-transformers architecture, diffusers ``VQModel`` tree) that turns each
rendered modality map into discrete token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


Array = jax.Array

_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """Hyper-parameters of the VQGAN (names follow diffusers `VQModel`).

  The spatial downsampling factor is 2 ** (len(block_out_channels) - 1).
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
  layers_per_block: int = 2
  latent_channels: int = 256
  num_vq_embeddings: int = 1024
  vq_embed_dim: int = 256
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  # Compute dtype of convolutions / matmuls; parameters stay float32 and the
  # codebook search always runs in float32.
  dtype: str = "float32"

  def __post_init__(self):
    # Configs may hand over lists; keep the dataclass hashable.
    object.__setattr__(self, "block_out_channels",
                       tuple(int(c) for c in self.block_out_channels))

  @classmethod
  def tiny(cls) -> "VQGANConfig":
    """A small f4 model for tests and CPU demos."""
    return cls(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=32,
        vq_embed_dim=32,
        num_vq_embeddings=64,
        norm_num_groups=8,
    )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def _conv(features: int, kernel: int, dtype: Any, name: str,
          strides: int = 1, padding: Any = "SAME") -> nn.Conv:
  if kernel == 3 and padding == "SAME":
    padding = ((1, 1), (1, 1))  # explicit, like torch padding=1
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, dtype=dtype, name=name)


def _group_norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  # Two-pass variance: matches torch more closely than E[x^2] - E[x]^2.
  return nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """Pre-norm residual block: (GN, SiLU, conv3x3) x 2 plus a 1x1 shortcut."""

  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _group_norm(self.groups, self.dtype, "norm1")(x)
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(h))
    h = _group_norm(self.groups, self.dtype, "norm2")(h)
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all pixels with a residual connection."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, self.dtype, "group_norm")(x)
    y = y.reshape(b, h * w, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = (dense(n)(y)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
    # One head of width c; the default scale is 1/sqrt(c).
    o = jax.nn.dot_product_attention(q, k, v)
    o = dense("to_out_0")(o.reshape(b, h * w, c))
    return x + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnet -> (attention) -> resnet at the lowest resolution."""

  groups: int
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one pixel on the right and bottom only."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, self.dtype, "conv", strides=2,
                 padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, self.dtype, "conv")(x)


class ResnetStage(nn.Module):
  """``num_layers`` resnets, then an optional resampler (diffusers ``DownEncoderBlock2D`` with a
  ``downsamplers_0``, or ``UpDecoderBlock2D`` with an ``upsamplers_0``)."""

  out_channels: int
  num_layers: int
  groups: int
  resample: str | None  # "down", "up" or None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype,
                      name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image -> latent (before quant_conv), downsampling by 2**(n_blocks-1).

  `config` needs the fields of `VQGANConfig` used here (the KL VAE passes its
  own config). `double_z` doubles the output channels (mean and log-variance
  of a diagonal Gaussian, as diffusers' `Encoder(double_z=True)`).
  """

  config: VQGANConfig
  double_z: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dt = cfg.compute_dtype
    chans = cfg.block_out_channels
    g = cfg.norm_num_groups
    x = _conv(chans[0], 3, dt, "conv_in")(x.astype(dt))
    for i, ch in enumerate(chans):
      resample = "down" if i != len(chans) - 1 else None
      x = ResnetStage(ch, cfg.layers_per_block, g, resample, dt, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_attention, dt, name="mid_block")(x)
    x = nn.silu(_group_norm(g, dt, "conv_norm_out")(x))
    out = cfg.latent_channels * (2 if self.double_z else 1)
    return _conv(out, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
  """Latent (after post_quant_conv) -> image; channels in reversed order."""

  config: VQGANConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    dt = cfg.compute_dtype
    chans = tuple(reversed(cfg.block_out_channels))
    g = cfg.norm_num_groups
    x = _conv(chans[0], 3, dt, "conv_in")(z.astype(dt))
    x = MidBlock(g, cfg.mid_block_attention, dt, name="mid_block")(x)
    for i, ch in enumerate(chans):
      resample = "up" if i != len(chans) - 1 else None
      x = ResnetStage(ch, cfg.layers_per_block + 1, g, resample, dt, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, dt, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, dt, "conv_out")(x)


class VectorQuantizer(nn.Module):
  """Nearest-neighbour codebook lookup with a straight-through estimator."""

  num_embeddings: int
  embed_dim: int

  def setup(self):
    n = self.num_embeddings
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -1.0 / n, 1.0 / n)
    # Flax path quantize/embedding/embedding <-> torch quantize.embedding.weight
    self.embedding = nn.Embed(n, self.embed_dim, embedding_init=init)

  def codebook(self) -> Array:
    return self.embedding.embedding

  def lookup(self, ids: Array) -> Array:
    return jnp.take(self.codebook(), ids, axis=0)

  def nearest_ids(self, z: Array) -> Array:
    """argmin_k ||z - e_k||^2 over the last axis of z (float32)."""
    e = self.codebook().astype(jnp.float32)
    zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    # ||z||^2 is the same for every code of a row, so it is left out.
    scores = jnp.sum(e * e, axis=-1)[None, :] - 2.0 * jnp.matmul(
        zf, e.T, precision=jax.lax.Precision.HIGHEST)
    ids = jnp.argmin(scores, axis=-1).astype(jnp.int32)
    return ids.reshape(z.shape[:-1])

  def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    ids = self.nearest_ids(z)
    z_q = self.lookup(ids).astype(jnp.float32)
    zf = z.astype(jnp.float32)
    sg = jax.lax.stop_gradient
    aux = {
        # Pulls the encoder output towards its code (weighted by beta later).
        "commitment_loss": jnp.mean(jnp.square(sg(z_q) - zf)),
        # Pulls the codes towards the encoder outputs.
        "codebook_loss": jnp.mean(jnp.square(z_q - sg(zf))),
        "perplexity": _perplexity(ids, self.num_embeddings),
    }
    z_st = zf + sg(z_q - zf)  # value of z_q, gradient of z
    return z_st.astype(z.dtype), ids, aux


def _perplexity(ids: Array, n: int) -> Array:
  counts = jnp.bincount(ids.reshape(-1), length=n).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


class VQGAN(nn.Module):
  """VQGAN autoencoder. Use `apply(..., method=...)` for the parts."""

  config: VQGANConfig

  def setup(self):
    cfg = self.config
    dt = cfg.compute_dtype
    self.encoder = Encoder(cfg)
    self.quant_conv = _conv(cfg.vq_embed_dim, 1, dt, None)
    # Attribute `vq` so that `quantize` can be a method; the scope keeps the
    # diffusers name.
    self.vq = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim,
                              name="quantize")
    self.post_quant_conv = _conv(cfg.latent_channels, 1, dt, None)
    self.decoder = Decoder(cfg)

  def encode(self, x: Array) -> Array:
    """[B,H,W,C] in [-1,1] -> continuous latent [B,H/f,W/f,vq_embed_dim]."""
    return self.quant_conv(self.encoder(x))

  def quantize(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (straight-through z_q, int32 ids [B,h,w], aux losses).

    aux holds the raw (unweighted) 'commitment_loss' and 'codebook_loss' MSE
    terms and the codebook 'perplexity' of this batch.
    """
    return self.vq(z)

  def encode_ids(self, x: Array) -> Array:
    """Image -> token ids [B,h,w] int32."""
    return self.vq.nearest_ids(self.encode(x))

  def decode(self, z_q: Array) -> Array:
    """Quantized latent [B,h,w,vq_embed_dim] -> image [B,H,W,out_channels]."""
    return self.decoder(self.post_quant_conv(z_q))

  def decode_ids(self, ids: Array) -> Array:
    """Token ids [B,h,w] -> image."""
    return self.decode(self.vq.lookup(ids))

  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """Encode, quantize, decode. Returns (reconstruction, aux)."""
    z_q, ids, aux = self.vq(self.encode(x))
    aux = dict(aux, ids=ids)
    return self.decode(z_q), aux
