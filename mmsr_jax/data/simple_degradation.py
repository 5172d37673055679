"""A simple one-stage degradation (blur -> downsample -> noise -> JPEG) for the tiny demo.

The full Real-ESRGAN second-order pipeline lives elsewhere; this one is cheap, runs on the host
with OpenCV and is deterministic given a ``np.random.Generator``.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

BLUR_SIGMA_RANGE = (0.2, 1.5)
NOISE_SIGMA_RANGE = (0.0, 8.0 / 255.0)
JPEG_QUALITY_RANGE = (60, 95)  # inclusive
RESIZE_MODES = (cv2.INTER_AREA, cv2.INTER_CUBIC)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def bicubic_upsample(img: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """Resizes an image with OpenCV bicubic interpolation (the bicubic baseline).

  Args:
    img: HxWxC or HxW image, uint8 or float in [0, 1].
    size: output size, an int (square) or (height, width).

  Returns:
    The resized image; uint8 input stays uint8 (saturated), anything else becomes float32
    clipped to [0, 1].
  """
  h, w = _size_hw(size)
  img = np.asarray(img)
  if img.dtype == np.uint8:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
  out = cv2.resize(img.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
  return np.clip(out, 0.0, 1.0)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip of a uint8 RGB image through OpenCV."""
  ok, buf = cv2.imencode(".jpg", img[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
  if not ok:
    raise RuntimeError("cv2.imencode failed")
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def simple_degrade(hr: np.ndarray, rng: np.random.Generator, scale: int = 4) -> np.ndarray:
  """Degrades an HR image into an LR one, deterministically given ``rng``.

  Steps: Gaussian blur (sigma ~ U[0.2, 1.5]) -> resize to exactly H/scale x W/scale (area or
  bicubic, chosen at random) -> additive Gaussian noise (sigma ~ U[0, 8]/255) -> clip ->
  JPEG (quality ~ U{60..95}) -> quantised to multiples of 1/255.

  Args:
    hr: float HxWx3 in [0, 1]; H and W divisible by ``scale``.
    rng: the random generator; the same generator state gives the same output.
    scale: the downsampling factor.

  Returns:
    float32 (H/scale)x(W/scale)x3 in [0, 1].
  """
  hr = np.asarray(hr, np.float32)
  if hr.ndim != 3 or hr.shape[-1] != 3:
    raise ValueError(f"simple_degrade expects an HxWx3 image, got shape {hr.shape}")
  h, w = hr.shape[:2]
  if h % scale or w % scale:
    raise ValueError(
        f"simple_degrade: image shape {hr.shape} is not divisible by scale={scale}")
  sigma = float(rng.uniform(*BLUR_SIGMA_RANGE))
  mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
  noise_sigma = float(rng.uniform(*NOISE_SIGMA_RANGE))
  quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))

  radius = max(1, int(math.ceil(3.0 * sigma)))
  x = cv2.GaussianBlur(hr, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                       borderType=cv2.BORDER_REFLECT_101)
  x = cv2.resize(x, (w // scale, h // scale), interpolation=mode)
  x = x + rng.normal(0.0, 1.0, size=x.shape).astype(np.float32) * np.float32(noise_sigma)
  x8 = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  x8 = _jpeg(x8, quality)
  return x8.astype(np.float32) / np.float32(255.0)
