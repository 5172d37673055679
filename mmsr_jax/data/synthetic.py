"""Synthetic modality maps (scene layouts, depth fields, edges of synthetic scenes) for the VQ
tokenizers: where real annotated maps are missing, and as a fixed held-out set."""

from __future__ import annotations

import cv2
import numpy as np

from mmsr_jax.data.modalities import canny, colorize_seg

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Smooth random field in about [-1, 1]: a ``cells x cells`` grid upsampled bicubically."""
  g = rng.standard_normal((cells, cells)).astype(np.float32)
  return cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)


def synthetic_seg(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random scene layout: 2-10 warped Voronoi regions with random class labels (int32)."""
  n = int(rng.integers(2, 11))
  seeds = rng.uniform(0, size, (n, 2)).astype(np.float32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  amp = size * float(rng.uniform(0.0, 0.15))
  yy = yy + amp * _smooth_noise(rng, size, 4)
  xx = xx + amp * _smooth_noise(rng, size, 4)
  stretch = rng.uniform(0.5, 2.0, (n, 1, 1)).astype(np.float32)
  d = (yy[None] - seeds[:, 0, None, None]) ** 2 * stretch + (xx[None] - seeds[:, 1, None, None]) ** 2
  labels = rng.integers(1, 151, n).astype(np.int32)  # ADE20K-like class ids
  if rng.random() < 0.3:
    labels[0] = 0  # an unlabelled region
  return labels[np.argmin(d, axis=0)]


def synthetic_depth(rng: np.random.Generator, size: int,
                    seg: np.ndarray | None = None) -> np.ndarray:
  """A smooth depth field in [0, 1] (nearer = brighter): a tilted ground plane, low-frequency
  relief and a few objects at their own depth (regions of ``seg`` or Gaussian blobs)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
  depth = rng.uniform(0.3, 1.0) * yy + rng.uniform(-0.3, 0.3) * xx
  depth = depth + 0.15 * _smooth_noise(rng, size, int(rng.integers(2, 6)))
  if seg is not None and rng.random() < 0.5:
    for label in np.unique(seg)[: int(rng.integers(1, 4))]:
      depth = np.where(seg == label, rng.uniform(0.0, 1.0) + 0.1 * yy, depth)
  else:
    for _ in range(int(rng.integers(0, 4))):
      cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
      depth = depth + rng.uniform(0.2, 0.8) * blob
  depth = cv2.GaussianBlur(depth.astype(np.float32), (0, 0), max(0.5, size / 128))
  lo, hi = float(depth.min()), float(depth.max())
  return ((depth - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def synthetic_edge(rng: np.random.Generator, size: int) -> np.ndarray:
  """Canny edges (the project's thresholds) of a synthetic scene: a coloured layout shaded by a
  depth field, with texture noise; float32 {0, 1}."""
  seg = synthetic_seg(rng, size)
  shade = 0.5 + 0.5 * synthetic_depth(rng, size, seg)
  img = colorize_seg(seg).astype(np.float32) * shade[..., None]
  img = img + rng.uniform(0, 25) * _smooth_noise(rng, size, size // 4)[..., None]
  img = img + rng.uniform(0, 8) * rng.standard_normal(img.shape).astype(np.float32)
  return canny(np.clip(img, 0, 255).astype(np.uint8))


def synthetic_map(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """A raw synthetic map of ``kind`` (the input format of ``render_map``)."""
  if kind == "seg":
    return synthetic_seg(rng, size)
  if kind == "depth":
    return synthetic_depth(rng, size, synthetic_seg(rng, size) if rng.random() < 0.5 else None)
  return synthetic_edge(rng, size)
