"""The FID Inception-v3 of pytorch-fid in Flax (2048-d pool features) and the Frechet distance."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

SIZE = 299
BN_EPS = 1e-3
HI = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
  """Convolution without bias -> batch norm (running statistics) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    k = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, cin, self.features))
    gamma = self.param("bn_scale", nn.initializers.ones, (self.features,))
    beta = self.param("bn_bias", nn.initializers.zeros, (self.features,))
    mean = self.param("bn_mean", nn.initializers.zeros, (self.features,))
    var = self.param("bn_var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HI)
    scale = gamma / jnp.sqrt(var + BN_EPS)
    return nn.relu(y * scale + (beta - mean * scale))


def _max_pool(x, k=3, s=2, p=0):
  return nn.max_pool(x, (k, k), strides=(s, s), padding=((p, p), (p, p)))


def _avg_pool_no_pad(x):
  """3x3 / stride 1 / pad 1 average that divides by the number of real pixels."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, col[0], padding=col[1], name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, row[0], padding=row[1], name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, col[0], padding=col[1], name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """The last blocks; ``max_pool_branch`` is pytorch-fid's FIDInceptionE_2 (Mixed_7c)."""
  max_pool_branch: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool(x, 3, 1, 1) if self.max_pool_branch else _avg_pool_no_pad(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
  """(out_len, in_len) matrix of PyTorch's bilinear resize with ``align_corners=False``."""
  src = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
  i1 = np.minimum(i0 + 1, in_len - 1)
  frac = src - i0
  m = np.zeros((out_len, in_len), np.float64)
  np.add.at(m, (np.arange(out_len), i0), 1.0 - frac)
  np.add.at(m, (np.arange(out_len), i1), frac)
  return m


def resize_299(x: jax.Array) -> jax.Array:
  """NHWC float images -> 299x299 (PyTorch bilinear, align_corners=False)."""
  _, h, w, _ = x.shape
  mh = jnp.asarray(bilinear_matrix(h, SIZE), jnp.float32)
  mw = jnp.asarray(bilinear_matrix(w, SIZE), jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=HI)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=HI)


class FIDInceptionV3(nn.Module):
  """NHWC RGB in [0, 1], any size -> (B, 2048) pool features."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = resize_299(x.astype(jnp.float32)) * 2.0 - 1.0
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def abstract_params():
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(lambda a: FIDInceptionV3().init(jax.random.key(0), a), x)


def features_from_uint8(params, images: jax.Array) -> jax.Array:
  """(B, 2048) pool features of BxHxWx3 uint8 images."""
  return FIDInceptionV3().apply(params, images.astype(jnp.float32) / 255.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Fréchet distance of two Gaussians (float64; pytorch-fid's handling of singular products:
  a small diagonal offset when the matrix square root is not finite, imaginary parts dropped)."""
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Gaussians of different dimension: {mu1.shape} vs {mu2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
  """FID of two (N, D) feature sets (N >= 2 each)."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if len(f1) < 2 or len(f2) < 2:
    raise ValueError(f"FID needs at least two images per set, got {len(f1)} and {len(f2)}")
  return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0),
                          np.cov(f2, rowvar=False))
