"""DISTS (Ding et al. 2020) in Flax: the VGG16 features of LPIPS with DISTS' structure / texture
terms; weights from ``mmsr_jax.weights.metric_nets``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsr_jax.evaluation.lpips import VGG16, FeatureNet

CHANNELS = (3, 64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6


class DISTS(nn.Module):
  """DISTS distance of two NHWC RGB batches in [0, 1]; returns a (B,) array."""

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    b = x0.shape[0]
    x = jnp.concatenate([x0, x1]).astype(jnp.float32)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    feats = [x] + FeatureNet(VGG16, pool="l2", name="net")((x - mean) / std)
    n = sum(CHANNELS)
    alpha = self.param("alpha", nn.initializers.constant(0.1), (n,))
    beta = self.param("beta", nn.initializers.constant(0.1), (n,))
    total = jnp.sum(alpha) + jnp.sum(beta)
    s1s, s2s = [], []
    for f in feats:
      f0, f1 = f[:b], f[b:]
      m0, m1 = jnp.mean(f0, axis=(1, 2)), jnp.mean(f1, axis=(1, 2))
      v0 = jnp.mean((f0 - m0[:, None, None]) ** 2, axis=(1, 2))
      v1 = jnp.mean((f1 - m1[:, None, None]) ** 2, axis=(1, 2))
      cov = jnp.mean(f0 * f1, axis=(1, 2)) - m0 * m1
      s1s.append((2 * m0 * m1 + C1) / (m0 * m0 + m1 * m1 + C1))
      s2s.append((2 * cov + C2) / (v0 + v1 + C2))
    s1 = jnp.concatenate(s1s, axis=-1)
    s2 = jnp.concatenate(s2s, axis=-1)
    return 1.0 - (s1 @ alpha + s2 @ beta) / total


def abstract_params(size: int = 64):
  """Shapes of the DISTS parameter tree (``{"params": ...}``)."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: DISTS().init(jax.random.key(0), a, b), x, x)


def dists_from_uint8(params, pred: jax.Array, gt: jax.Array) -> jax.Array:
  """DISTS of BxHxWx3 uint8 batches."""
  return DISTS().apply(params, pred.astype(jnp.float32) / 255.0, gt.astype(jnp.float32) / 255.0)

