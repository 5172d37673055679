"""Samples of a training degradation applied to one HR image, with the parameters drawn for each
and a contact sheet, to look at what the model sees (``python -m mmsr_jax.degrade``).
"""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np

from mmsr_jax.data import realesrgan, realesrgan_params
from mmsr_jax.data.simple_degradation import simple_degrade

SHEET_FILE = "contact_sheet.png"


def check_preset(preset: str) -> None:
  """ValueError unless ``preset`` is 'simple' or a Real-ESRGAN preset."""
  if preset != "simple":
    realesrgan_params.get_preset(preset)


def fit_image(hr: np.ndarray, scale: int, max_side: int, where: str) -> np.ndarray:
  """The centre ``max_side`` square (0: the whole image), trimmed to a multiple of ``scale``;
  ValueError when less than ``4 * scale`` pixels remain on a side."""
  h, w = hr.shape[:2]
  if max_side and max(h, w) > max_side:
    nh, nw = min(h, max_side), min(w, max_side)
    hr = hr[(h - nh) // 2:(h - nh) // 2 + nh, (w - nw) // 2:(w - nw) // 2 + nw]
    h, w = nh, nw
  h, w = h - h % scale, w - w % scale
  if min(h, w) < 4 * scale:
    raise ValueError(f"{where}: {hr.shape[0]}x{hr.shape[1]} is too small for scale {scale}")
  return np.ascontiguousarray(hr[:h, :w])


def output_names(num: int) -> list[str]:
  """The files ``write_samples`` writes for ``num`` samples."""
  return ([f"lr_{i:02d}.png" for i in range(num)] + [f"params_{i:02d}.json" for i in range(num)]
          + [SHEET_FILE])


def degrade_samples(hr: np.ndarray, preset: str, scale: int, num: int,
                    seed: int) -> tuple[list[np.ndarray], list[dict]]:
  """``num`` degradations of ``hr`` (uint8 HxWx3) as uint8 LR images, sample i drawn from the
  generator seeded ``(seed, i)``, and for each its parameters as JSON-ready values."""
  h, w = hr.shape[:2]
  hr01 = hr.astype(np.float32) / np.float32(255.0)
  samples, params = [], []
  if preset == "simple":
    for i in range(num):
      samples.append(simple_degrade(hr01, np.random.default_rng([seed, i]), scale=scale))
      params.append({"preset": "simple"})
  else:
    deg = realesrgan.RealESRGANDegrader(preset, scale)
    ps = [deg.sample(np.random.default_rng([seed, i]), (h, w)) for i in range(num)]
    for b in range(0, num, 8):  # batches of 8: one compilation, bounded memory
      chunk = ps[b:b + 8]
      samples += list(deg(np.repeat(hr01[None], len(chunk), 0), realesrgan_params.stack_params(chunk)))
    params = [dict(_jsonable(p), preset=preset) for p in ps]
  return [np.round(s * 255.0).astype(np.uint8) for s in samples], params


def _jsonable(p: dict) -> dict:
  # A blur kernel is 21x21 numbers: its support says more, in one.
  out = {}
  for k, v in p.items():
    v = np.asarray(v)
    if k in ("k1", "k2", "sinc"):
      nz = np.argwhere(np.abs(v) > 0)
      out[k + "_support"] = int(nz[:, 0].max() - nz[:, 0].min() + 1) if len(nz) else 0
    else:
      out[k] = v.tolist()
  return out


def contact_sheet(hr: np.ndarray, samples: list[np.ndarray], cols: int = 0) -> np.ndarray:
  """The HR image followed by the samples (nearest-upscaled to the HR size) on a grid."""
  h, w = hr.shape[:2]
  tiles = [hr] + [cv2.resize(s, (w, h), interpolation=cv2.INTER_NEAREST) for s in samples]
  cols = cols or int(math.ceil(math.sqrt(len(tiles))))
  rows = int(math.ceil(len(tiles) / cols))
  sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
  for k, t in enumerate(tiles):
    r, c = divmod(k, cols)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
  return sheet


def write_samples(output: str, hr: np.ndarray, lrs: list[np.ndarray], params: list[dict],
                  seed: int) -> None:
  """Writes ``output_names(len(lrs))`` into ``output``: each LR as PNG, its parameters (with its
  seed and size) as JSON, and the contact sheet."""
  os.makedirs(output, exist_ok=True)
  for i, (lr, p) in enumerate(zip(lrs, params)):
    cv2.imwrite(os.path.join(output, f"lr_{i:02d}.png"), lr[..., ::-1])
    with open(os.path.join(output, f"params_{i:02d}.json"), "w") as fh:
      json.dump(dict(p, seed=[seed, i], lr_size=list(lr.shape[:2])), fh, indent=1)
  cv2.imwrite(os.path.join(output, SHEET_FILE), contact_sheet(hr, lrs)[..., ::-1])
