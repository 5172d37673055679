"""Operator maps of photo crops for the VQ tokenizer (``config.vq_train.source='folder'``): the
depth / seg / edge maps that ``data.modalities.operator_maps`` makes from a crop of the size the
SR model trains on, so the tokenizer learns exactly the maps the SR pipeline will feed it
(``config.data.maps_from`` 'hr', or 'lr' from the degraded crop)."""

from __future__ import annotations

from typing import Any

import grain.python as pygrain
import numpy as np

from mmsr_jax.data.modalities import MODALITIES, operator_maps, render_map
from mmsr_jax.data.simple_degradation import simple_degrade
from mmsr_jax.data.sources import FolderSource

HELDOUT_SEED = 8642


def _fit(image: np.ndarray, side: int) -> np.ndarray:
  """The image upscaled (cubic) so its short side is at least ``side``."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  if min(h, w) >= side:
    return image
  f = side / min(h, w)
  return cv2.resize(image, (max(side, round(w * f)), max(side, round(h * f))),
                    interpolation=cv2.INTER_CUBIC)


def crop_operator_maps(image: np.ndarray, top: int, left: int, side: int, flip: bool,
                       map_size: int, *, from_lr: bool = False, scale: int = 4,
                       rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """The rendered operator maps (``[map_size, map_size, 3]`` in [-1, 1]) of one crop of a uint8
  photo; ``from_lr``: of the crop degraded x``scale`` by the simple degradation (``rng``), as
  ``config.data.maps_from='lr'`` makes them."""
  crop = np.ascontiguousarray(image[top:top + side, left:left + side])
  if flip:
    crop = np.ascontiguousarray(crop[:, ::-1])
  if from_lr:
    crop = simple_degrade(crop.astype(np.float32) / np.float32(255.0), rng, scale=scale)
  return {k: render_map(k, v, map_size) for k, v in operator_maps(crop, map_size).items()}


def _stack(rendered: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"maps": np.stack([rendered[k] for k in MODALITIES]),
          "present": np.ones(len(MODALITIES), np.bool_)}


class OperatorMapsExample(pygrain.RandomMapTransform):
  """A folder record -> ``{'maps': [3, M, M, 3], 'present': [3]}``: a random ``crop_size`` crop
  (mirrored half the time) and its operator maps, made from the degraded crop with probability
  ``lr_fraction``. All randomness from grain's per-record ``rng``."""

  def __init__(self, crop_size: int, map_size: int, lr_fraction: float, scale: int):
    self.crop, self.size = int(crop_size), int(map_size)
    self.lr_fraction, self.scale = float(lr_fraction), int(scale)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = _fit(record["image"], self.crop)
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
    flip = bool(rng.random() < 0.5)
    from_lr = bool(rng.random() < self.lr_fraction)
    return _stack(crop_operator_maps(image, top, left, self.crop, flip, self.size,
                                     from_lr=from_lr, scale=self.scale, rng=rng))


def train_source(config) -> FolderSource:
  return FolderSource(config.vq_train.path, field="config.vq_train.path")


def transform(config) -> OperatorMapsExample:
  vt = config.vq_train
  return OperatorMapsExample(vt.crop_size or config.data.map_size, config.data.map_size,
                             vt.lr_fraction, vt.scale)


def heldout_boxes(h: int, w: int, side: int, n: int, key: int) -> list[tuple[int, int]]:
  """``n`` fixed crop boxes (top, left) of an ``h x w`` image: the centre, then random ones
  drawn from a seed of the image's index ``key`` (independent of ``config.seed``)."""
  rng = np.random.default_rng([HELDOUT_SEED, int(key)])
  boxes = [((h - side) // 2, (w - side) // 2)]
  for _ in range(n - 1):
    boxes.append((int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))))
  return boxes


def heldout_maps(config) -> dict[str, dict[str, Any]]:
  """The report's held-out maps: the operator maps of ``eval_crops`` fixed crops of every photo
  in ``config.vq_train.eval_path`` (made from the HR crops: the maps the tokens must keep for
  the oracle condition), per modality ``{'maps': [N, M, M, 3], 'origin', 'num_real',
  'num_synthetic'}``."""
  vt, size = config.vq_train, int(config.data.map_size)
  side = int(vt.crop_size or size)
  folder = FolderSource(vt.eval_path, field="config.vq_train.eval_path")
  out: dict[str, list[np.ndarray]] = {k: [] for k in MODALITIES}
  for i in range(len(folder)):
    image = _fit(folder[i]["image"], side)
    h, w = image.shape[:2]
    for top, left in heldout_boxes(h, w, side, int(vt.eval_crops), i):
      for k, m in crop_operator_maps(image, top, left, side, False, size).items():
        out[k].append(m)
  origin = f"operator maps of {len(folder)} photos x {vt.eval_crops} crops ({vt.eval_path})"
  return {k: {"maps": np.stack(v).astype(np.float32), "origin": origin, "num_real": len(v),
              "num_synthetic": 0} for k, v in out.items()}
