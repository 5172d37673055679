"""PSNR and SSIM on MATLAB's Y channel with the diffusion-SR papers' conventions, as jitted float32
(accurate to about 1e-6 against float64) and float64 NumPy versions; conventions in
``docs/internals.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255.0) ** 2
SSIM_C2 = (0.03 * 255.0) ** 2
_CENTER = 128.0  # subtracted from Y*255 before the second moments (shift-invariant stats).


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The normalised 1D Gaussian (float64); its outer product is the 2D SSIM window."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  k = np.exp(-(x**2) / (2.0 * sigma**2))
  return k / k.sum()


def _as_float01(img) -> jax.Array | np.ndarray:
  """uint8 -> float32 / 255; float inputs are taken as [0, 1] already."""
  if isinstance(img, np.ndarray) and img.dtype == np.uint8:
    return img.astype(np.float32) / np.float32(255.0)
  if isinstance(img, jax.Array) and img.dtype == jnp.uint8:
    return img.astype(jnp.float32) / 255.0
  return img


def rgb_to_y(img) -> jax.Array:
  """MATLAB YCbCr luma of an RGB image, in [0, 1].

  Args:
    img: HxWx3 (or ...x3) RGB, uint8 or float in [0, 1].

  Returns:
    float32 Y of shape img.shape[:-1], (16 + 65.481 R + 128.553 G + 24.966 B) / 255.
  """
  x = jnp.asarray(_as_float01(img), jnp.float32)
  if x.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects ...x3 RGB, got shape {x.shape}")
  w = jnp.asarray(Y_WEIGHTS, jnp.float32)
  return (Y_OFFSET + jnp.sum(x * w, axis=-1)) / 255.0


def _check_pair(pred, gt) -> None:
  if pred.shape != gt.shape:
    raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
  if pred.ndim != 3 or pred.shape[-1] != 3:
    raise ValueError(f"expected HxWx3 RGB images, got shape {pred.shape}")


def _mean_2d(x: jax.Array) -> jax.Array:
  """Mean of an HxW float32 array in two stages (rows, then columns) for less rounding."""
  return jnp.mean(jnp.mean(x, axis=1))


def _psnr_y_core(pred: jax.Array, gt: jax.Array) -> jax.Array:
  # Y is affine in RGB, so the Y difference is the weighted RGB difference: exact zero for
  # identical inputs and no cancellation of the +16 offset.
  w = jnp.asarray(Y_WEIGHTS, jnp.float32) / 255.0
  d = jnp.sum((pred.astype(jnp.float32) - gt.astype(jnp.float32)) * w, axis=-1)
  mse = _mean_2d(d * d)
  return jnp.where(mse > 0, -10.0 * jnp.log10(jnp.maximum(mse, 1e-30)), jnp.inf)


_psnr_y_jit = jax.jit(_psnr_y_core)


def psnr_y(pred, gt) -> float:
  """PSNR (dB) on the Y channel, data range 1; +inf for identical Y.

  Args:
    pred: HxWx3 RGB, uint8 or float in [0, 1].
    gt: same shape and convention as pred.
  """
  _check_pair(pred, gt)
  return float(_psnr_y_jit(_as_float01(pred), _as_float01(gt)))


def _filter_valid(x: jax.Array, k: np.ndarray) -> jax.Array:
  """Separable 'valid' correlation of HxW x with the window k (explicit shifted adds)."""
  n = len(k)
  h, w = x.shape
  rows = sum(float(k[i]) * x[i:h - n + 1 + i, :] for i in range(n))
  return sum(float(k[j]) * rows[:, j:w - n + 1 + j] for j in range(n))


def _ssim_map_from_y255(y1: jax.Array, y2: jax.Array) -> jax.Array:
  """SSIM map of two integer-valued Y*255 images (float32), 'valid' region."""
  k = gaussian_window_1d()
  a = y1 - _CENTER
  b = y2 - _CENTER
  ma = _filter_valid(a, k)
  mb = _filter_valid(b, k)
  saa = _filter_valid(a * a, k) - ma * ma
  sbb = _filter_valid(b * b, k) - mb * mb
  sab = _filter_valid(a * b, k) - ma * mb
  mu1 = ma + _CENTER
  mu2 = mb + _CENTER
  lum = (2.0 * mu1 * mu2 + SSIM_C1) / (mu1 * mu1 + mu2 * mu2 + SSIM_C1)
  cs = jnp.maximum((2.0 * sab + SSIM_C2) / (saa + sbb + SSIM_C2), 0.0)
  return lum * cs


def _ssim_y_core(pred: jax.Array, gt: jax.Array) -> jax.Array:
  y1 = jnp.round(rgb_to_y(pred) * 255.0)
  y2 = jnp.round(rgb_to_y(gt) * 255.0)
  return _mean_2d(_ssim_map_from_y255(y1, y2))


_ssim_y_jit = jax.jit(_ssim_y_core)


def ssim_y(pred, gt) -> float:
  """SSIM on round(Y * 255) with the conventions in the module docstring.

  Args:
    pred: HxWx3 RGB, uint8 or float in [0, 1]; H, W >= 11.
    gt: same shape and convention as pred.
  """
  _check_pair(pred, gt)
  if min(pred.shape[:2]) < SSIM_WINDOW:
    raise ValueError(f"ssim_y needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, "
                     f"got {pred.shape}")
  return float(_ssim_y_jit(_as_float01(pred), _as_float01(gt)))


@functools.partial(jax.jit, static_argnames="crop_border")
def _psnr_ssim_batch_jit(pred: jax.Array, gt: jax.Array, crop_border: int):
  if crop_border:
    pred = pred[:, crop_border:-crop_border, crop_border:-crop_border]
    gt = gt[:, crop_border:-crop_border, crop_border:-crop_border]
  pred = pred.astype(jnp.float32) / 255.0
  gt = gt.astype(jnp.float32) / 255.0
  return jax.vmap(_psnr_y_core)(pred, gt), jax.vmap(_ssim_y_core)(pred, gt)


def psnr_ssim_batch(pred, gt, *, crop_border: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """PSNR and SSIM (Y channel, conventions above) of a batch of equally sized uint8 pairs.

  One jitted call for the whole batch (uint8 is sent to the device, 4x less than float).

  Args:
    pred: BxHxWx3 uint8 RGB.
    gt: same shape, uint8.
    crop_border: pixels removed at each border before scoring (classic SR papers crop the
      scale factor; the diffusion-SR papers crop nothing).

  Returns:
    (psnr, ssim), two float arrays of B values.
  """
  if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-1] != 3:
    raise ValueError(f"expected two BxHxWx3 batches of equal shape, got {pred.shape} and "
                     f"{gt.shape}")
  if pred.dtype != np.uint8 or gt.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {pred.dtype} and {gt.dtype}")
  if min(pred.shape[1:3]) - 2 * crop_border < SSIM_WINDOW:
    raise ValueError(f"images of {pred.shape[1]}x{pred.shape[2]} with crop_border="
                     f"{crop_border} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
  p, s = _psnr_ssim_batch_jit(jnp.asarray(pred), jnp.asarray(gt), int(crop_border))
  return np.asarray(p, np.float64), np.asarray(s, np.float64)


# ----------------------------------------------------------------------------------------------
# float64 NumPy reference versions.


def rgb_to_y_np(img: np.ndarray) -> np.ndarray:
  """float64 NumPy version of ``rgb_to_y``."""
  img = np.asarray(img)
  x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
  return (Y_OFFSET + x @ np.asarray(Y_WEIGHTS, np.float64)) / 255.0


def psnr_y_np(pred: np.ndarray, gt: np.ndarray) -> float:
  """float64 NumPy version of ``psnr_y``."""
  _check_pair(pred, gt)
  mse = float(np.mean((rgb_to_y_np(pred) - rgb_to_y_np(gt)) ** 2))
  return float("inf") if mse == 0 else -10.0 * float(np.log10(mse))


def _filter_valid_np(x: np.ndarray) -> np.ndarray:
  k = gaussian_window_1d()
  n = len(k)
  h, w = x.shape
  rows = sum(k[i] * x[i:h - n + 1 + i, :] for i in range(n))
  return sum(k[j] * rows[:, j:w - n + 1 + j] for j in range(n))


def ssim_y_np(pred: np.ndarray, gt: np.ndarray) -> float:
  """float64 NumPy version of ``ssim_y``."""
  _check_pair(pred, gt)
  y1 = np.round(rgb_to_y_np(pred) * 255.0)
  y2 = np.round(rgb_to_y_np(gt) * 255.0)
  mu1, mu2 = _filter_valid_np(y1), _filter_valid_np(y2)
  s11 = _filter_valid_np(y1 * y1) - mu1 * mu1
  s22 = _filter_valid_np(y2 * y2) - mu2 * mu2
  s12 = _filter_valid_np(y1 * y2) - mu1 * mu2
  lum = (2 * mu1 * mu2 + SSIM_C1) / (mu1**2 + mu2**2 + SSIM_C1)
  cs = np.maximum((2 * s12 + SSIM_C2) / (s11 + s22 + SSIM_C2), 0.0)
  return float(np.mean(lum * cs))


def edge_f1(pred, true, tolerance: int = 1) -> dict[str, jax.Array]:
  """Precision, recall and F1 of binary edge maps ``[..., H, W]`` (nonzero = line pixel), the
  counts pooled over the leading axes. A predicted line pixel is correct when a true one lies
  within ``tolerance`` pixels (Chebyshev distance), and a true line pixel is recovered when a
  predicted one does: the usual tolerance of edge benchmarks, since a line drawn one pixel off
  is not a lost edge. An empty prediction has precision 0, an empty truth recall 0."""
  p = jnp.asarray(pred) != 0
  t = jnp.asarray(true) != 0
  if p.shape != t.shape or p.ndim < 2:
    raise ValueError(f"edge_f1: maps of shapes {p.shape} and {t.shape}; expected equal [..., H, W]")
  p = p.reshape((-1,) + p.shape[-2:]).astype(jnp.float32)
  t = t.reshape((-1,) + t.shape[-2:]).astype(jnp.float32)
  k = 2 * int(tolerance) + 1

  def dilate(m):
    return jax.lax.reduce_window(m, 0.0, jax.lax.max, (1, k, k), (1, 1, 1), "SAME")

  precision = jnp.sum(p * dilate(t)) / jnp.maximum(jnp.sum(p), 1.0)
  recall = jnp.sum(t * dilate(p)) / jnp.maximum(jnp.sum(t), 1.0)
  f1 = 2 * precision * recall / jnp.maximum(precision + recall, 1e-8)
  return {"precision": precision, "recall": recall, "f1": f1}
