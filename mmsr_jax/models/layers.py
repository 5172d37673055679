"""Shared building blocks: embeddings, attention and dense layers with logical axis names.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that the
trainer can map them onto any mesh with a table of rules (see ``mmsr_jax/runtime/sharding.py``).
Names used here: ``embed`` (model width), ``mlp`` (MLP hidden), ``heads`` (attention
projections), ``vocab`` (embedding tables), ``latents`` / ``tokens`` (learned token blocks),
``conv_in`` / ``conv_out`` (patch embedding kernels).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.schema.choices import REMAT

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str, str], *, name: str, dtype: Dtype = jnp.float32,
          use_bias: bool = True, kernel_init=default_kernel_init,
          bias_init=nn.initializers.zeros) -> nn.Dense:
  """A Dense layer whose kernel and bias carry logical axis names."""
  return nn.Dense(
      features, name=name, dtype=dtype, use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)))


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Sharding constraint on ``[B, T, D]`` activations (logical ``batch, length, act_embed``).

  A no-op unless a step is traced inside ``mmsr_jax.runtime.sharding.activation_rules`` (training);
  there it keeps the batch split over the data-parallel mesh axes through the blocks.
  """
  return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int],
                    axes: tuple[str | None, ...]):
  """Declares a raw parameter with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape))


def layer_norm(name: str, *, affine: bool = True, eps: float = 1e-6,
               dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, use_bias=affine, use_scale=affine, name=name, dtype=dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def timestep_sinusoids(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features, ``[cos | sin]`` order (diffusers ``flip_sin_to_cos=True``)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """1D sin-cos embedding of positions ``pos`` (any shape) -> ``[..., dim]``, ``[sin | cos]``."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = pos.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int | None = None,
              interpolation_scale: float = 1.0) -> np.ndarray:
  """2D sin-cos position embedding ``[grid_h * grid_w, dim]`` (row-major tokens).

  Positions follow PixArt: ``pos = arange(n) / (n / base_size) / interpolation_scale``, so a grid
  larger than the training grid samples the same range more densely. ``base_size=None`` means
  plain integer positions. The first half of the channels encodes the column (width) position,
  the second half the row, as in the PixArt/DiT reference embedding.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
  def positions(n):
    p = np.arange(n, dtype=np.float64)
    if base_size is not None:
      p = p / (n / base_size)
    return p / interpolation_scale
  gy, gx = np.meshgrid(positions(grid_h), positions(grid_w), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, gx), sincos_1d(dim // 2, gy)], axis=1)
  return emb.astype(np.float32)


def resolve_attention(setting: str, dtype, platform: str | None = None) -> str:
  """The attention kernel a setting means on ``platform`` (the platform of the devices the
  program is compiled for; default: this process's backend): ``auto`` picks cuDNN's fused
  kernel on GPUs in bf16 / fp16 and the Pallas flash kernel on TPUs, else XLA's attention. An
  explicit kernel the platform cannot run is an error."""
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if setting == "auto":
    if platform == "gpu" and half:
      return "cudnn"
    return "flash" if platform == "tpu" else "xla"
  if setting == "cudnn" and (platform != "gpu" or not half):
    raise ValueError(f"config.model.attention='cudnn' needs a GPU and bfloat16 / float16 "
                     f"compute (platform {platform!r}, {jnp.dtype(dtype).name})")
  if setting == "flash" and platform != "tpu":
    raise ValueError(f"config.model.attention='flash' is the TPU Pallas kernel (platform "
                     f"{platform!r})")
  return setting


def _mesh_axes_dividing(logical: str | None, dim: int, mesh) -> tuple[str, ...] | None:
  """The mesh axes the active logical rules give ``logical``, if their product divides ``dim``
  (else None: that dimension stays whole on every device)."""
  if logical is None:
    return None
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  names = tuple(a for a in names if a in mesh.axis_names)
  if not names or dim % math.prod(mesh.shape[a] for a in names):
    return None
  return names


FLASH_BLOCK = 128


def flash_fits(q_len: int, kv_len: int) -> bool:
  """Whether the flash kernel tiles these lengths: multiples of its 128-long blocks (its backward
  pass keeps the softmax statistics in 128-lane blocks, so shorter sequences do not trace)."""
  return q_len % FLASH_BLOCK == 0 and kv_len % FLASH_BLOCK == 0


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The TPU Pallas flash kernel on ``[B, T, N, H]`` tensors.

  XLA cannot partition a Mosaic kernel, so under a mesh (a step traced inside
  ``mmsr_jax.runtime.sharding.activation_rules``) the kernel runs in a ``shard_map``: the batch
  split as the rules place ``batch`` and the heads as they place ``heads``, each device
  attending over its own rows and heads (attention mixes neither). Traced outside any mesh
  (parameter init under ``eval_shape``, one device) it is the plain kernel call.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  from jax.sharding import PartitionSpec as P

  b = FLASH_BLOCK
  blocks = tpu_flash.BlockSizes(
      block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b, block_k_major_dkv=b,
      block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b, block_q_dq=b)

  def kernel(q, k, v):
    out = tpu_flash.flash_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)),
                                    sm_scale=q.shape[-1] ** -0.5, block_sizes=blocks)
    return out.transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v)
  batch = _mesh_axes_dividing("batch", q.shape[0], mesh)
  heads = _mesh_axes_dividing("heads", q.shape[2], mesh)
  spec = P(batch, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              key_scale: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
  """Multi-head attention on ``[B, T, N, H]`` tensors.

  ``key_scale`` (``[B, S]``) multiplies each key before the softmax: per-modality temperature
  (``K* = K / delta``) enters this way, so no bias is materialised and the fused kernels still
  apply. ``mask`` (``[B, S]``, True = attend) is broadcast over heads and queries; a masked call
  runs XLA's attention (the masked calls are the MMLC's small cross-attentions to the caption).
  ``implementation`` is a resolved kernel name (:func:`resolve_attention`); the flash kernel
  takes the sequences it can tile (:func:`flash_fits`), XLA's attention the others.
  """
  if key_scale is not None:
    k = k * key_scale[:, :, None, None].astype(k.dtype)
  if mask is None and implementation == "flash" and flash_fits(q.shape[1], k.shape[1]):
    return flash_attention(q, k, v)
  if mask is None and implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if mask is not None:
    mask = mask[:, None, None, :].astype(bool)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def remat_policy(name: str):
  """``nn.remat`` policy of a ``config.model.remat`` setting (None: no rematerialisation)."""
  if name in ("none", False):
    return None
  if name in ("full", True):
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":  # keep the projection / MLP matmul outputs, recompute the rest
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"remat policy {name!r}: expected one of {REMAT}")


_UNROLL = [False]


@contextlib.contextmanager
def unrolled_scans():
  """Traces the layer stacks as straight-line code while active. XLA's cost analysis counts a
  while loop's body once, so FLOP counts are read from a program traced this way."""
  _UNROLL.append(True)
  try:
    yield
  finally:
    _UNROLL.pop()


def scan_blocks(block_cls, *, depth: int, remat: str = "none", broadcast: int = 0):
  """``block_cls`` applied ``depth`` times as one ``nn.scan`` over stacked parameters (leading
  ``layers`` axis), optionally rematerialised. ``block_cls.__call__(carry, *args)`` returns
  ``(carry, None)``; its ``broadcast`` extra arguments are the same for every layer."""
  policy = remat_policy(remat)
  if policy is not None:
    block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * broadcast, length=depth,
                 unroll=depth if _UNROLL[-1] else 1,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Attention(nn.Module):
  """Multi-head attention with q/k/v/out projections (diffusers ``Attention`` layout)."""

  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  qk_norm: bool = False
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x, context=None, *, mask=None, key_scale=None):
    context = x if context is None else context
    head_dim = self.width // self.num_heads
    def proj(name, inp):
      y = dense(self.width, ("embed", "heads"), name=name, dtype=self.dtype)(inp)
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)
    q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
    if self.qk_norm:
      q = nn.RMSNorm(name="norm_q", dtype=self.dtype)(q)
      k = nn.RMSNorm(name="norm_k", dtype=self.dtype)(k)
    out = attention(q, k, v, mask=mask, key_scale=key_scale,
                    implementation=self.implementation)
    out = out.reshape(*out.shape[:-2], self.width)
    return dense(self.width, ("heads", "embed"), name="to_out", dtype=self.dtype)(out)


class Mlp(nn.Module):
  """Two-layer GELU(tanh) MLP (PixArt / diffusers ``FeedForward`` with ``gelu-approximate``)."""

  width: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=True)
    return dense(self.width, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """Pads the leading dimension to ``rows`` by repeating the last row (results are dropped)."""
  extra = rows - x.shape[0]
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def map_rows(fn, args: tuple, chunk: int, *, interleave: bool = False) -> jax.Array:
  """``fn(*args)`` for a row-wise ``fn``, run over the leading dimension in sequential passes of
  ``chunk`` rows (one ``lax.map``, so only one pass's activations are live); the same result.

  Rows are padded to a whole number of passes by repeating the last. ``interleave``: pass ``j``
  takes rows ``j, j + k, ...`` (``k`` passes), so that each pass of a batch-sharded array spreads
  over every device rather than over a block of them.
  """
  rows = args[0].shape[0]
  k = -(-rows // chunk)
  if k <= 1:
    return fn(*args)
  def split(a):
    a = pad_rows(a, k * chunk)
    if interleave:
      return jnp.moveaxis(a.reshape(chunk, k, *a.shape[1:]), 1, 0)
    return a.reshape(k, chunk, *a.shape[1:])
  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
  if interleave:
    out = jnp.moveaxis(out, 0, 1)
  return out.reshape(k * chunk, *out.shape[2:])[:rows]
