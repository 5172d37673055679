"""LPIPS (Zhang et al. 2018) in Flax, AlexNet and VGG16 backbones with the lpips v0.1 heads; weights
from ``mmsr_jax.weights.metric_nets``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision ``features`` layouts: ("conv", index, out_channels, kernel, stride, padding),
# ("relu",), ("pool", index, window) (max pooling, stride 2), ("tap",) = an output.
ALEXNET = (("conv", 0, 64, 11, 4, 2), ("relu",), ("tap",), ("pool", 2, 3),
           ("conv", 3, 192, 5, 1, 2), ("relu",), ("tap",), ("pool", 5, 3),
           ("conv", 6, 384, 3, 1, 1), ("relu",), ("tap",),
           ("conv", 8, 256, 3, 1, 1), ("relu",), ("tap",),
           ("conv", 10, 256, 3, 1, 1), ("relu",), ("tap",))


def _vgg16_layout() -> tuple:
  layers, idx = [], 0
  for stage, (n_convs, ch) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))):
    if stage:
      layers.append(("pool", idx, 2))
      idx += 1
    for _ in range(n_convs):
      layers += [("conv", idx, ch, 3, 1, 1), ("relu",)]
      idx += 2
    layers.append(("tap",))
  return tuple(layers)


VGG16 = _vgg16_layout()
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
LAYOUTS = {"alex": ALEXNET, "vgg": VGG16}


def l2_pool(x: jax.Array) -> jax.Array:
  """DISTS' L2 pooling: sqrt(depthwise 3x3 Hann-window average of x^2, stride 2, pad 1)."""
  a = np.hanning(5)[1:-1]
  g = np.outer(a, a) / np.outer(a, a).sum()
  c = x.shape[-1]
  k = jnp.asarray(np.tile(g[:, :, None, None], (1, 1, 1, c)), x.dtype)
  out = jax.lax.conv_general_dilated(
      x * x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(out + 1e-12)


class FeatureNet(nn.Module):
  """A torchvision ``features`` stack (AlexNet or VGG16) returning the activations at the taps.

  ``pool="max"`` is the torchvision network; ``pool="l2"`` replaces each max-pool with DISTS'
  L2 pooling.
  """
  layout: Sequence[tuple]
  pool: str = "max"

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outs = []
    for layer in self.layout:
      kind = layer[0]
      if kind == "conv":
        _, idx, ch, k, s, p = layer
        x = nn.Conv(ch, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                    precision=jax.lax.Precision.HIGHEST, name=f"features_{idx}")(x)
      elif kind == "relu":
        x = nn.relu(x)
      elif kind == "tap":
        outs.append(x)
      elif self.pool == "l2":
        x = l2_pool(x)
      else:
        w = layer[2]
        x = nn.max_pool(x, (w, w), strides=(2, 2), padding="VALID")
    return outs


def unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Channel-wise unit normalisation of NHWC activations, as lpips does it."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance of two NHWC RGB batches in [-1, 1]; returns a (B,) array."""
  net: str = "alex"

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    if self.net not in LAYOUTS:
      raise ValueError(f"LPIPS net must be one of {sorted(LAYOUTS)}, got {self.net!r}")
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    feats = FeatureNet(LAYOUTS[self.net], name="net")
    b = x0.shape[0]
    both = feats((jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale)
    total = jnp.zeros((b,), jnp.float32)
    for k, (f, ch) in enumerate(zip(both, CHANNELS[self.net])):
      w = self.param(f"lin{k}", nn.initializers.constant(1.0 / ch), (ch,))
      d = (unit_normalize(f[:b]) - unit_normalize(f[b:])) ** 2
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w,
                                          precision=jax.lax.Precision.HIGHEST), axis=(1, 2))
    return total


def abstract_params(net: str, size: int = 64):
  """Shapes of the LPIPS parameter tree (``{"params": ...}``) without computing anything."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: LPIPS(net).init(jax.random.key(0), a, b), x, x)


def lpips_from_uint8(params, pred: jax.Array, gt: jax.Array, *, net: str) -> jax.Array:
  """LPIPS of BxHxWx3 uint8 batches (converted to [-1, 1] as the lpips package does)."""
  to = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
  return LPIPS(net).apply(params, to(pred), to(gt))

