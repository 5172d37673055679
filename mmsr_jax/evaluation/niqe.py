"""NIQE (Mittal et al. 2013) with pyiqa's conventions: the per-pixel and per-block features as one
jitted batch function, the final Gaussian distance in float64 on the host; conventions in
``docs/internals.md``.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

BLOCK = 96
PARAMS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                           "niqe_pris_params.npz")
YIQ_WEIGHTS = (0.299, 0.587, 0.114)
# The AGGD shape grid and the gamma-function ratios used by the fit, in float64.
_ALPHA_GRID = np.arange(0.2, 10.001, 0.001)
_R_GRID = np.exp(2 * gammaln(2 / _ALPHA_GRID) - gammaln(1 / _ALPHA_GRID)
                 - gammaln(3 / _ALPHA_GRID))
_BETA_FACTOR = np.exp(0.5 * (gammaln(1 / _ALPHA_GRID) - gammaln(3 / _ALPHA_GRID)))
_MEAN_FACTOR = np.exp(gammaln(2 / _ALPHA_GRID) - gammaln(1 / _ALPHA_GRID))
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.lru_cache(maxsize=None)
def pristine_params(path: str = PARAMS_PATH) -> dict[str, np.ndarray]:
  """The pristine model: ``mu`` (36,), ``cov`` (36, 36) and the 7x7 ``window`` (float64)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"NIQE pristine parameters not found at {path} (they ship with the "
                            "package in mmsr_jax/assets/)")
  with np.load(path) as d:
    return {"mu": np.asarray(d["mu_pris_param"], np.float64).reshape(-1),
            "cov": np.asarray(d["cov_pris_param"], np.float64),
            "window": np.asarray(d["gaussian_window"], np.float64)}


def luminance255(images, color: str = "yiq") -> jax.Array:
  """Rounded luminance in [0, 255] of ...xHxWx3 uint8 RGB images (float32).

  ``color="yiq"``: 0.299 R + 0.587 G + 0.114 B (pyiqa's NIQE default); ``"ycbcr"``: MATLAB's
  YCbCr Y, (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (BasicSR's default).
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if color == "yiq":
    y = jnp.sum(x * jnp.asarray(YIQ_WEIGHTS, jnp.float32), axis=-1)
  elif color == "ycbcr":
    y = (16.0 + jnp.sum(x * jnp.asarray((65.481, 128.553, 24.966), jnp.float32), -1)) / 255.0
  else:
    raise ValueError(f"NIQE color must be 'yiq' or 'ycbcr', got {color!r}")
  return jnp.round(y * 255.0)


# ------------------------------------------------------------------------------ MATLAB imresize


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
  ax = np.abs(x)
  return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
          + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def matlab_resize_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
  """(out_len, in_len) float64 matrix of MATLAB's ``imresize(..., 'bicubic')`` along one axis.

  Antialiasing when shrinking (the kernel is widened by 1/scale), symmetric (mirror) padding at
  the borders, weights normalised to sum to one per output sample: the same rule as MATLAB and
  its BasicSR / pyiqa ports.
  """
  width = 4.0
  if scale < 1:
    width /= scale
  x = np.arange(1, out_len + 1, dtype=np.float64)
  u = x / scale + 0.5 * (1 - 1 / scale)
  left = np.floor(u - width / 2)
  taps = math.ceil(width) + 2
  idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input positions
  dist = u[:, None] - idx
  w = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
  w = w / w.sum(axis=1, keepdims=True)
  j = idx.astype(np.int64) - 1  # 0-based, then mirrored into range
  j = np.where(j < 0, -j - 1, j)
  j = np.where(j >= in_len, 2 * in_len - 1 - j, j)
  m = np.zeros((out_len, in_len), np.float64)
  np.add.at(m, (np.repeat(np.arange(out_len), taps), j.reshape(-1)), w.reshape(-1))
  return m


def _half_size(x: jax.Array) -> jax.Array:
  """MATLAB bicubic x0.5 (antialiased) of a batch BxHxW."""
  _, h, w = x.shape
  mh = jnp.asarray(matlab_resize_matrix(h, math.ceil(h / 2), 0.5), jnp.float32)
  mw = jnp.asarray(matlab_resize_matrix(w, math.ceil(w / 2), 0.5), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhw->bow", mh, x, precision=hi)
  return jnp.einsum("pw,bow->bop", mw, x, precision=hi)


# ------------------------------------------------------------------------------------ features


def _filter_same(x: jax.Array, k: np.ndarray) -> jax.Array:
  """Separable correlation of BxHxW with the 1D window k, replicated ('nearest') borders."""
  n = len(k)
  r = n // 2
  _, h, w = x.shape
  xp = jnp.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
  rows = sum(float(k[i]) * xp[:, i:i + h, :] for i in range(n))
  rp = jnp.pad(rows, ((0, 0), (0, 0), (r, r)), mode="edge")
  return sum(float(k[j]) * rp[:, :, j:j + w] for j in range(n))


def _mscn(x: jax.Array, k: np.ndarray) -> jax.Array:
  """Mean-subtracted contrast-normalised coefficients (x - mu) / (sigma + 1)."""
  c = x - 128.0  # variance is shift invariant; centring keeps float32 cancellation small
  mu = _filter_same(c, k)
  var = _filter_same(c * c, k) - mu * mu
  return (c - mu) / (jnp.sqrt(jnp.abs(var)) + 1.0)


def _aggd(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """AGGD fit over the last axis: (alpha, beta_left, beta_right); NaN when a side is empty."""
  neg, pos = v < 0, v > 0
  nl, nr = jnp.sum(neg, -1), jnp.sum(pos, -1)
  left = jnp.sqrt(jnp.sum(jnp.where(neg, v * v, 0.0), -1) / nl)
  right = jnp.sqrt(jnp.sum(jnp.where(pos, v * v, 0.0), -1) / nr)
  g = left / right
  rhat = jnp.mean(jnp.abs(v), -1) ** 2 / jnp.mean(v * v, -1)
  rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
  r_grid = jnp.asarray(_R_GRID, jnp.float32)
  pos_idx = jnp.argmin((r_grid - rnorm[..., None]) ** 2, axis=-1)
  alpha = jnp.asarray(_ALPHA_GRID, jnp.float32)[pos_idx]
  bf = jnp.asarray(_BETA_FACTOR, jnp.float32)[pos_idx]
  bad = (nl == 0) | (nr == 0) | ~jnp.isfinite(rnorm)
  nan = jnp.float32(jnp.nan)
  return (jnp.where(bad, nan, alpha), jnp.where(bad, nan, left * bf),
          jnp.where(bad, nan, right * bf)), pos_idx


def _block_features(blocks: jax.Array) -> jax.Array:
  """18 NSS features of each block in ...xbxb -> ...x18."""
  flat = blocks.reshape(*blocks.shape[:-2], -1)
  (a, bl, br), _ = _aggd(flat)
  feats = [a, (bl + br) / 2]
  for s in _SHIFTS:
    prod = blocks * jnp.roll(blocks, s, axis=(-2, -1))
    (a, bl, br), idx = _aggd(prod.reshape(flat.shape))
    mean = (br - bl) * jnp.asarray(_MEAN_FACTOR, jnp.float32)[idx]
    feats += [a, mean, bl, br]
  return jnp.stack(feats, axis=-1)


def _to_blocks(x: jax.Array, b: int) -> jax.Array:
  """BxHxW (multiples of b) -> Bx(nblocks)xbxb."""
  n, h, w = x.shape
  x = x.reshape(n, h // b, b, w // b, b).transpose(0, 1, 3, 2, 4)
  return x.reshape(n, -1, b, b)


@jax.jit
def niqe_features(y255: jax.Array) -> jax.Array:
  """Block features of a batch of luminance images.

  Args:
    y255: BxHxW float luminance in [0, 255] (rounded), H and W multiples of 96.

  Returns:
    Bx(H/96 * W/96)x36 float32: the 18 features at full scale, then the 18 at half scale.
  """
  k = np.asarray(pristine_params()["window"]).sum(axis=1)  # the window is outer(k, k)
  x = y255.astype(jnp.float32)
  f1 = _block_features(_to_blocks(_mscn(x, k), BLOCK))
  half = _half_size(x / 255.0) * 255.0
  f2 = _block_features(_to_blocks(_mscn(half, k), BLOCK // 2))
  return jnp.concatenate([f1, f2], axis=-1)


def score_from_features(feats: np.ndarray, params: dict | None = None) -> float:
  """NIQE of one image from its (nblocks, 36) features (float64 on the host)."""
  p = params or pristine_params()
  f = np.asarray(feats, np.float64)
  mu = np.nanmean(f, axis=0)
  ok = f[~np.isnan(f).any(axis=1)]
  if len(ok) < 2:
    return float("nan")
  cov = np.cov(ok, rowvar=False)
  d = p["mu"] - mu
  return float(np.sqrt(d @ np.linalg.pinv((p["cov"] + cov) / 2) @ d))


def crop_to_blocks(shape_hw: tuple[int, int]) -> tuple[int, int]:
  """The (H, W) NIQE uses: whole 96x96 blocks; raises if fewer than two blocks fit."""
  h, w = (shape_hw[0] // BLOCK) * BLOCK, (shape_hw[1] // BLOCK) * BLOCK
  if h * w < 2 * BLOCK * BLOCK:
    raise ValueError(f"NIQE needs at least two {BLOCK}x{BLOCK} blocks; image is "
                     f"{shape_hw[0]}x{shape_hw[1]}")
  return h, w


def niqe(images, *, color: str = "yiq", crop_border: int = 0) -> np.ndarray:
  """NIQE of a batch of equally sized RGB images.

  Args:
    images: BxHxWx3 (or HxWx3) uint8 RGB.
    color: luminance convention, "yiq" (pyiqa) or "ycbcr" (BasicSR).
    crop_border: pixels removed at each border first.

  Returns:
    float64 array of B scores (lower is better).
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise ValueError(f"niqe expects BxHxWx3 uint8 RGB, got {x.dtype} {x.shape}")
  if crop_border:
    x = x[:, crop_border:-crop_border, crop_border:-crop_border]
  h, w = crop_to_blocks(x.shape[1:3])
  y = luminance255(x, color)[:, :h, :w]
  feats = np.asarray(niqe_features(y))
  return np.array([score_from_features(f) for f in feats])


def pooled_niqe(images, *, color: str = "yiq") -> float:
  """One NIQE score of a set of images too small for NIQE on their own (it needs two 96x96
  blocks per image): the blocks of every image (whole blocks from the top-left, as
  :func:`niqe` crops) pooled into one Gaussian fit against the pristine model. A score of the
  set's naturalness, not a mean of per-image NIQEs, so not comparable with those."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise ValueError(f"pooled_niqe expects BxHxWx3 uint8 RGB, got {x.dtype} {x.shape}")
  h, w = (x.shape[1] // BLOCK) * BLOCK, (x.shape[2] // BLOCK) * BLOCK
  if h == 0 or w == 0 or len(x) * (h // BLOCK) * (w // BLOCK) < 2:
    raise ValueError(f"pooled NIQE needs at least two {BLOCK}x{BLOCK} blocks in the set; got "
                     f"{len(x)} images of {x.shape[1]}x{x.shape[2]}")
  feats = np.asarray(niqe_features(luminance255(x, color)[:, :h, :w]))
  return score_from_features(feats.reshape(-1, feats.shape[-1]))
