"""The T5 encoder (T5 v1.1 / Flan-T5 and original T5) in Flax, laid out like transformers'
``T5EncoderModel``: RMS norms, no biases, unscaled attention with a shared relative position bias.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.models import layers


Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Encoder hyper-parameters (names follow transformers' `T5Config`)."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # 'gated-gelu' (T5 v1.1, Flan-T5), 'relu' (original T5), or any
  # '[gated-]{relu,gelu,gelu_new,silu}'.
  feed_forward_proj: str = "gated-gelu"
  # Compute dtype; parameters stay float32 and norms run in float32.
  dtype: str = "float32"

  @classmethod
  def tiny(cls, vocab_size: int = 259) -> "T5Config":
    """A small encoder for tests and CPU demos (259 = byte-level vocab)."""
    return cls(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128,
               num_layers=2, num_heads=4)

  @classmethod
  def t5_v1_1_xxl(cls) -> "T5Config":
    """google/t5-v1_1-xxl encoder (the PixArt text encoder)."""
    return cls(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
               num_layers=24, num_heads=64)

  @classmethod
  def flan_t5_xl(cls) -> "T5Config":
    """google/flan-t5-xl encoder."""
    return cls(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120,
               num_layers=24, num_heads=32)

  @classmethod
  def flan_t5_base(cls) -> "T5Config":
    """google/flan-t5-base encoder."""
    return cls(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048,
               num_layers=12, num_heads=12)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> Callable[[Array], Array]:
    name = self.feed_forward_proj.split("-")[-1]
    if self.feed_forward_proj == "gated-gelu":
      name = "gelu_new"  # transformers maps gated-gelu to the tanh GELU
    if name not in _ACTIVATIONS or self.feed_forward_proj.count("-") > 1:
      raise ValueError(f"Unsupported feed_forward_proj "
                       f"'{self.feed_forward_proj}'.")
    return _ACTIVATIONS[name]

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket ids [query_len, key_len] (static, numpy).

  Half of the buckets are for keys after the query. Within each half, small
  distances get one bucket each and larger ones share log-spaced buckets up to
  `max_distance`. Float32 arithmetic as in the reference implementation, so
  that boundary cases fall into the same bucket.
  """
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
  large = log_ratio / np.float32(math.log(max_distance / max_exact))
  large = large * np.float32(half - max_exact)
  large = np.where(dist < max_exact, 0, large)  # avoid casting -inf
  large = np.minimum(max_exact + large.astype(np.int64), half - 1)
  return buckets + np.where(dist < max_exact, dist, large)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, name=name)


def _rms_norm(cfg: T5Config, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype,
                    use_fast_variance=False, name=name)


class T5SelfAttention(nn.Module):
  """Multi-head self-attention with an additive position bias, unscaled."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, position_bias: Array) -> Array:
    cfg = self.config
    dt = cfg.compute_dtype
    b, length, _ = x.shape
    inner = cfg.num_heads * cfg.d_kv
    heads = lambda t: t.reshape(b, length, cfg.num_heads, cfg.d_kv)
    q = heads(_dense(inner, dt, "q")(x))
    k = heads(_dense(inner, dt, "k")(x))
    v = heads(_dense(inner, dt, "v")(x))
    out = jax.nn.dot_product_attention(
        q, k, v, bias=position_bias.astype(q.dtype), mask=mask, scale=1.0)
    return _dense(cfg.d_model, dt, "o")(out.reshape(b, length, inner))


class T5FeedForward(nn.Module):
  """(Gated) MLP: wo(act(wi_0 x) * wi_1 x), or wo(act(wi x)) when not gated."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dt = cfg.compute_dtype
    act = cfg.activation
    if cfg.is_gated:
      gate = act(_dense(cfg.d_ff, dt, "wi_0")(x))
      h = gate * _dense(cfg.d_ff, dt, "wi_1")(x)
    else:
      h = act(_dense(cfg.d_ff, dt, "wi")(x))
    return _dense(cfg.d_model, dt, "wo")(h)


class T5LayerSelfAttention(nn.Module):
  """x + SelfAttention(RMSNorm(x))."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, position_bias: Array) -> Array:
    h = _rms_norm(self.config, "layer_norm")(x)
    h = T5SelfAttention(self.config, name="SelfAttention")(h, mask, position_bias)
    return x + h.astype(x.dtype)


class T5LayerFF(nn.Module):
  """x + DenseReluDense(RMSNorm(x))."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _rms_norm(self.config, "layer_norm")(x)
    h = T5FeedForward(self.config, name="DenseReluDense")(h)
    return x + h.astype(x.dtype)


class T5Block(nn.Module):
  """Self-attention sub-layer (layer_0), then feed-forward (layer_1); ``(x, ...) -> (x, None)``
  for ``nn.scan``."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, position_bias: Array) -> tuple[Array, None]:
    x = T5LayerSelfAttention(self.config, name="layer_0")(x, mask, position_bias)
    return T5LayerFF(self.config, name="layer_1")(x), None


class T5Encoder(nn.Module):
  """Token ids -> contextual embeddings (after the final RMS norm)."""

  config: T5Config

  @nn.compact
  def __call__(self, input_ids: Array,
               attention_mask: Array | None = None) -> Array:
    """input_ids [B,L] int; attention_mask [B,L] (1 = token, 0 = padding)."""
    cfg = self.config
    x = nn.Embed(cfg.vocab_size, cfg.d_model, name="shared")(input_ids)
    x = x.astype(cfg.compute_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    mask = attention_mask.astype(jnp.bool_)[:, None, None, :]  # [B,1,1,L]
    # The relative position bias is computed once and shared by every layer (transformers
    # keeps its table in the first layer; here it sits beside the scanned stack).
    length = input_ids.shape[1]
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                     name="relative_attention_bias")
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, H, L, L]
    blocks = layers.scan_blocks(T5Block, depth=cfg.num_layers, broadcast=2)
    x, _ = blocks(cfg, name="block")(x, mask, position_bias.astype(jnp.float32))
    return _rms_norm(cfg, "final_layer_norm")(x)
