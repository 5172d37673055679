"""Where an SR example's HR crop comes from: the record resized so its short side fits the crop,
and the fixed boxes of a record's crop bank that precomputed features belong to.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def resize_min_side(record: dict[str, Any], min_side: int) -> dict[str, Any]:
  """Upscales image (cubic), depth (linear) and seg (nearest) so the short side >= min_side."""
  h, w = record["image"].shape[:2]
  if min(h, w) >= min_side:
    return record
  f = min_side / min(h, w)
  nh, nw = max(min_side, int(round(h * f))), max(min_side, int(round(w * f)))
  out = dict(record)
  out["image"] = cv2.resize(record["image"], (nw, nh), interpolation=cv2.INTER_CUBIC)
  if record.get("depth") is not None:
    out["depth"] = cv2.resize(record["depth"], (nw, nh), interpolation=cv2.INTER_LINEAR)
  if record.get("seg") is not None:
    out["seg"] = cv2.resize(record["seg"].astype(np.int32), (nw, nh),
                            interpolation=cv2.INTER_NEAREST)
  return out


def crop(x: np.ndarray | None, top: int, left: int, size: int) -> np.ndarray | None:
  """The ``size`` square at (top, left) of an image or map; None stays None."""
  return None if x is None else x[top:top + size, left:left + size]


BANK_SEED = 20251126


def crop_bank_boxes(h: int, w: int, size: int, n: int, key: int) -> np.ndarray:
  """The ``n`` crop boxes of a record's token-id bank: int32 ``[n, 2]`` (top, left).

  A pure function of the (resized) image size ``h x w``, the crop side ``size`` and ``key`` (the
  record's index). The first box is the centre crop; the others are distinct positions drawn at
  random, and when the image has fewer than ``n`` positions they are all used and repeated.
  """
  if not 0 < size <= min(h, w):
    raise ValueError(f"crop side {size} does not fit a {h}x{w} image")
  if n < 1:
    raise ValueError(f"crop bank of {n} boxes: expected >= 1")
  nx = w - size + 1
  total = (h - size + 1) * nx
  centre = ((h - size) // 2) * nx + (w - size) // 2
  rng = np.random.default_rng([BANK_SEED, h, w, size, int(key)])
  m = min(n, total)
  others = rng.choice(total - 1, size=m - 1, replace=False) if m > 1 else np.zeros(0, np.int64)
  others = others + (others >= centre)  # skip the centre position
  flat = np.resize(np.concatenate([[centre], others]), n)  # repeats cyclically when m < n
  return np.stack([flat // nx, flat % nx], axis=-1).astype(np.int32)
