"""Modality maps as the VQ tokenizer sees them: the one Canny edge detector, crops of a record's
maps, and rendering (``size x size x 3`` float32 in [-1, 1]: depth and edges grey, segmentation
labels through a fixed palette with label 0 black).
"""

from __future__ import annotations

import cv2
import numpy as np

from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.formats.records import MODALITIES
CANNY_THRESHOLDS = (100, 200)
PALETTE_SEED = 20250318
PALETTE_SIZE = 256


def _make_palette() -> np.ndarray:
  rng = np.random.default_rng(PALETTE_SEED)
  palette = rng.integers(0, 256, size=(PALETTE_SIZE, 3), dtype=np.int64).astype(np.uint8)
  palette[0] = 0
  palette.setflags(write=False)
  return palette


SEG_PALETTE: np.ndarray = _make_palette()  # uint8 [256, 3], row 0 black.


def _to_uint8(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype == np.uint8:
    return img
  return np.round(np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def canny(image: np.ndarray) -> np.ndarray:
  """Canny edges (the project's thresholds) of a uint8 RGB (or grey) image at its own size, as
  float32 {0, 1}."""
  image = np.ascontiguousarray(image)
  grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
  return (cv2.Canny(grey, *CANNY_THRESHOLDS) > 0).astype(np.float32)


def canny_edges(lr: np.ndarray, size: int) -> np.ndarray:
  """Canny edges of an LR image (uint8, or float in [0, 1]) bicubic-upsampled to ``size``."""
  return canny(bicubic_upsample(_to_uint8(lr), size))


SEG_LEVELS = 3  # operator segmentation: levels per RGB channel (27 colour classes)
# Felzenszwalb's graph segmentation at the map size: its scale (larger = bigger regions) and the
# smallest region kept, in pixels of a 128-pixel map (scaled with the map's area).
SEG_GRAPH_SCALE = 100.0
SEG_MIN_REGION_128 = 24
# Dark-channel haze cue (He et al. 2009): the dark channel's window as a share of the map side,
# the share of haze removed, and the least transmission (caps the depth).
DEPTH_WINDOW_FRACTION = 1 / 16
DEPTH_HAZE_OMEGA = 0.95
DEPTH_MIN_TRANSMISSION = 0.05


def colour_class(rgb: np.ndarray) -> np.ndarray:
  """The colour class (1 .. SEG_LEVELS**3) of uint8 RGB values ``[..., 3]``."""
  q = rgb.astype(np.int32) * SEG_LEVELS // 256
  return 1 + (q[..., 0] * SEG_LEVELS + q[..., 1]) * SEG_LEVELS + q[..., 2]


def graph_segmentation(x: np.ndarray) -> np.ndarray:
  """Felzenszwalb's graph segmentation of a uint8 RGB image, each region labelled with the
  colour class of its mean colour: the regions follow the image's boundaries, and the labels
  mean the same in every image (a blue region is blue everywhere), unlike region indices."""
  from skimage.segmentation import felzenszwalb  # pylint: disable=g-import-not-at-top
  side = min(x.shape[:2])
  min_size = max(4, int(round(SEG_MIN_REGION_128 * (side / 128.0) ** 2)))
  regions = felzenszwalb(x, scale=SEG_GRAPH_SCALE, sigma=0.5, min_size=min_size)
  n = int(regions.max()) + 1
  count = np.bincount(regions.ravel(), minlength=n).astype(np.float64)
  means = np.stack([np.bincount(regions.ravel(), weights=x[..., c].ravel().astype(np.float64),
                                minlength=n) for c in range(3)], axis=-1)
  means = np.round(means / np.maximum(count, 1.0)[:, None]).astype(np.uint8)
  return colour_class(means)[regions].astype(np.int32)


def haze_depth(x: np.ndarray) -> np.ndarray:
  """A classical monocular depth cue in [0, 1] (far = 1): the dark channel prior's haze
  transmission ``t = 1 - omega * dark(I / A)``, depth ``-log t`` over its largest value. Outdoor
  scenes grow hazier, so brighter in every channel, with distance; it knows nothing indoors."""
  img = x.astype(np.float32) / np.float32(255.0)
  k = max(3, int(round(min(img.shape[:2]) * DEPTH_WINDOW_FRACTION)) | 1)
  kernel = np.ones((k, k), np.uint8)
  dark = cv2.erode(img.min(axis=-1), kernel)
  # The airlight: the mean colour of the haziest 0.1% of pixels (those with the brightest dark
  # channel), at least a small floor so a dark image does not divide by ~0.
  n = max(1, dark.size // 1000)
  idx = np.argpartition(dark.ravel(), -n)[-n:]
  airlight = np.maximum(img.reshape(-1, 3)[idx].mean(axis=0), np.float32(0.1))
  dark_norm = cv2.erode((img / airlight).min(axis=-1), kernel)
  t = np.clip(1.0 - DEPTH_HAZE_OMEGA * dark_norm, DEPTH_MIN_TRANSMISSION, 1.0)
  return (np.log(t) / np.float32(np.log(DEPTH_MIN_TRANSMISSION))).astype(np.float32)


def operator_maps(image: np.ndarray, size: int) -> dict[str, np.ndarray]:
  """Stand-in depth / seg / edge maps made by fixed image operators (no network) from an RGB
  image (uint8, or float in [0, 1]) brought to ``size`` (bicubic up, area down): ``edge`` its
  Canny edges, ``depth`` the dark-channel haze cue (:func:`haze_depth`), ``seg`` a graph
  segmentation with colour-class labels (:func:`graph_segmentation`; labels from 1).

  They carry what the image they are made from carries: from the LR nothing the LR lacks, from
  the HR crop its detail (``config.data.maps_from``: the oracle experiment).
  """
  x = _to_uint8(image)
  if x.ndim != 3 or x.shape[2] != 3:
    raise ValueError(f"operator_maps expects an HxWx3 image, got shape {x.shape}")
  if x.shape[:2] != (size, size):
    x = (bicubic_upsample(x, size) if min(x.shape[:2]) < size
         else cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA))
  x = np.ascontiguousarray(x)
  return {"depth": haze_depth(x), "seg": graph_segmentation(x), "edge": canny(x)}


def colorize_seg(labels: np.ndarray) -> np.ndarray:
  """Maps an integer label map to uint8 RGB with the fixed palette.

  Label 0 is black; labels >= 256 wrap onto colours 1..255 (never onto black).
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"segmentation maps must be integer label maps, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if (labels < 0).any():
    raise ValueError("segmentation labels must be >= 0")
  idx = np.where(labels == 0, 0, (labels - 1) % (PALETTE_SIZE - 1) + 1)
  return SEG_PALETTE[idx]


def _resize(x: np.ndarray, size: int, nearest: bool) -> np.ndarray:
  h, w = x.shape[:2]
  if (h, w) == (size, size):
    return x
  if nearest:
    interp = cv2.INTER_NEAREST
  elif h >= size and w >= size:
    interp = cv2.INTER_AREA
  else:
    interp = cv2.INTER_LINEAR
  return cv2.resize(x, (size, size), interpolation=interp)


def render_map(kind: str, array: np.ndarray, size: int) -> np.ndarray:
  """Renders one modality map as a ``size x size x 3`` float32 image in [-1, 1].

  Args:
    kind: 'depth' (float HxW in [0, 1]), 'edge' (float HxW in [0, 1], e.g. {0, 1}) or 'seg'
      (integer HxW label map).
    array: the map.
    size: output side; depth/edge are resized with area (down) or bilinear (up), seg with
      nearest neighbour (before colouring, so no colour mixing).

  Returns:
    float32 [size, size, 3] in [-1, 1].
  """
  if kind not in MODALITIES:
    raise ValueError(f"render_map: kind={kind!r}, expected one of {MODALITIES}")
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"render_map({kind!r}) expects an HxW map, got shape {array.shape}")
  if kind == "seg":
    labels = _resize(array.astype(np.int32), size, nearest=True)
    rgb = colorize_seg(labels).astype(np.float32)
    return rgb / np.float32(127.5) - np.float32(1.0)
  grey = _resize(np.clip(array.astype(np.float32), 0.0, 1.0), size, nearest=False)
  grey = np.clip(grey, 0.0, 1.0) * np.float32(2.0) - np.float32(1.0)
  return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def crop_maps(record: dict, top: int, left: int, side: int, flip: bool,
              kinds=MODALITIES) -> dict[str, np.ndarray]:
  """The raw maps of ``kinds`` that ``record`` has, cropped to the ``side`` box at (top, left) of
  its image frame and mirrored when ``flip``. A map stored at another size than the image (the
  annotator keeps LR-sized maps) is cropped at the box scaled onto its own frame."""
  image = record.get("image")
  h, w = image.shape[:2] if image is not None else next(
      record[k].shape for k in MODALITIES if record.get(k) is not None)
  out = {}
  for k in kinds:
    m = record.get(k)
    if m is None:
      continue
    fy, fx = m.shape[0] / h, m.shape[1] / w
    t, l_ = int(round(top * fy)), int(round(left * fx))
    sh, sw = max(1, int(round(side * fy))), max(1, int(round(side * fx)))
    m = m[t:t + sh, l_:l_ + sw]
    out[k] = np.ascontiguousarray(m[:, ::-1] if flip else m)
  return out


def render_crop_maps(record: dict, top: int, left: int, size: int, flip: bool,
                     map_size: int) -> dict[str, np.ndarray]:
  """The depth and seg maps of one training crop rendered at ``map_size``: what the SR input
  pipeline feeds the tokenizer and what ``python -m mmsr_jax.precompute`` stores ids of."""
  return {k: render_map(k, v, map_size)
          for k, v in crop_maps(record, top, left, size, flip, ("depth", "seg")).items()}
