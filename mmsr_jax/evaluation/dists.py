"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity") in Flax.

The backbone is torchvision's VGG16 with every max-pool replaced by L2 pooling (a 3x3 Hann
window, stride 2). Its "features" are the input image itself plus relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3 (3 + 64 + 128 + 256 + 512 + 512 = 1475 channels). Per channel, a texture term
compares the spatial means and a structure term the spatial (co)variances, SSIM-style with
c1 = c2 = 1e-6; learned weights alpha (texture) and beta (structure), normalised to sum to one
together, combine them: DISTS = 1 - sum_c (alpha_c S1_c + beta_c S2_c). Inputs are RGB in [0, 1];
the network sees them ImageNet-normalised, the first "feature" is the raw input.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def torch_to_flax(sd: dict[str, np.ndarray]) -> dict:
  """DISTS parameters from a torchvision VGG16 state dict (``features.N.weight``) merged with
  DISTS' ``alpha`` / ``beta`` (shape 1x1475x1x1). Returns the ``{"params": ...}`` tree."""
  net = {}  # the same names as LPIPS-VGG's backbone
  for layer in VGG16:
    if layer[0] == "conv":
      idx, ch = layer[1], layer[2]
      for key in (f"features.{idx}.weight", f"features.{idx}.bias"):
        if key not in sd:
          raise ValueError(f"backbone state dict has no {key!r} (expected torchvision vgg16 keys)")
      w = np.asarray(sd[f"features.{idx}.weight"], np.float32)
      if w.shape[0] != ch or w.shape[2:] != (3, 3):
        raise ValueError(f"features.{idx}.weight: shape {w.shape}, expected ({ch}, *, 3, 3)")
      net[f"features_{idx}"] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                                "bias": np.asarray(sd[f"features.{idx}.bias"], np.float32)}
  out = {"net": net}
  for name in ("alpha", "beta"):
    if name not in sd:
      raise ValueError(f"DISTS weights: no {name!r} in the state dict")
    v = np.asarray(sd[name], np.float32).reshape(-1)
    if v.shape != (sum(CHANNELS),):
      raise ValueError(f"DISTS {name}: {v.size} values, expected {sum(CHANNELS)}")
    out[name] = v
  return {"params": out}
