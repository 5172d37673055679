"""Random-access training sources (demo photos, image folders, TFDS, annotated ArrayRecord shards),
all returning the same record dict, and ``CheckedSource``, which skips, logs and counts bad images
and stops a run when too many are bad.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import cv2
import grain.python as pygrain
import jax
import numpy as np
import ml_collections
from absl import logging

from mmsr_jax.data import demo
from mmsr_jax.data.images import DEFAULT_MAX_PIXELS, BadImage, read_image
from mmsr_jax.formats.records import (decode_record, list_shards, read_crop_bank, read_crops,
                                      read_features)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MIN_CHECKED = 20


def _caption_for(path: str, name_pattern: str = "") -> str:
  """The caption of an image file: its sidecar ``.txt``, else, when ``name_pattern`` (a regular
  expression with one group) matches the file name, that group with underscores as spaces
  (``config.data.caption_from_name``: scene photos named ``abbey_sun_xyz.jpg`` give "abbey"
  with ``^(.+?)_sun_``), else empty."""
  txt = os.path.splitext(path)[0] + ".txt"
  if os.path.isfile(txt):
    with open(txt, encoding="utf-8") as f:
      return " ".join(f.read().split())
  if name_pattern:
    m = re.match(name_pattern, os.path.basename(path))
    if m:
      return " ".join(m.group(1).replace("_", " ").split())
  return ""


class FolderSource:
  """All images under ``root`` (recursive, sorted); pickles as its file list. An image whose
  header claims more than ``max_pixels`` pixels is a BadImage, refused before decoding."""

  def __init__(self, root: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               field: str = "config.data.max_image_pixels", caption_from_name: str = ""):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.data.path={root!r}: no such image folder")
    files = []
    for dirpath, _, names in os.walk(root, followlinks=True):
      files += [os.path.join(dirpath, n) for n in names
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    if not files:
      raise ValueError(f"config.data.path={root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                       "found under it")
    self.root = root
    self.files = sorted(files)
    self.max_pixels, self.field = int(max_pixels), field
    self.caption_from_name = caption_from_name

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.files[int(index)]
    return {"name": path, "image": read_image(path, self.max_pixels, self.field),
            "depth": None, "seg": None,
            "caption": _caption_for(path, self.caption_from_name)}

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, n={len(self)})"


class TfdsSource:
  """A TFDS dataset through ``tfds.data_source`` (no TensorFlow input pipeline involved)."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "", caption_key: str = ""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._args = (name, split, data_dir, image_key, caption_key)
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                  try_gcs=False, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"config.data.path={name!r} (split {split!r}, data_dir {data_dir!r}): "
                       f"cannot open the TFDS dataset: {e}") from e
    info = getattr(self._ds, "dataset_info", None)
    if info is not None:
      keys = list(info.features.keys())
    elif len(self._ds):  # e.g. tfds.testing.mock_data: a plain sequence of examples
      keys = list(self._ds[0].keys())
    else:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
    if not image_key:
      image_key = next((k for k in ("hr", "image") if k in keys), "")
    if image_key not in keys:
      raise ValueError(f"TFDS dataset {name!r} has no image feature {image_key!r} "
                       f"(features: {keys}); set config.data.image_key")
    self.image_key, self.caption_key, self.name = image_key, caption_key, name

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      ex = self._ds[int(index)]
    except Exception as e:  # pylint: disable=broad-except
      raise BadImage(f"cannot decode record: {e}") from e
    image = np.asarray(ex[self.image_key])
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, -1)
    caption = ex.get(self.caption_key, b"") if self.caption_key else b""
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8")
    return {"name": f"{self.name}[{int(index)}]", "image": image[..., :3].astype(np.uint8),
            "depth": None, "seg": None, "caption": str(caption)}

  def __getstate__(self):
    return {"args": self._args}

  def __setstate__(self, state):
    self.__init__(*state["args"])


def training_record(data: bytes, default_name: str, crops_only: bool = False) -> dict[str, Any]:
  """An annotator record (bytes) as a training record (:func:`on_image_grid`), plus its crop
  bank (``'vq_bank'``) and encoder ``'features'`` where the precompute pass wrote them.

  ``crops_only``: a record with crop images (``formats.records``) is not decoded; it gives
  ``'crops'`` (still encoded: the training transform decodes the one box it draws),
  ``'image_hw'`` and None for the image and maps."""
  crops = read_crops(data) if crops_only else None
  if crops is not None:
    head = decode_record(data, pixels=False)
    out = {"name": head["meta"].get("name", default_name), "image": None, "depth": None,
           "seg": None, "caption": head["caption"] or "", "crops": crops,
           "image_hw": tuple(crops["meta"]["image_hw"])}
  else:
    out = on_image_grid(decode_record(data), default_name)
  bank = read_crop_bank(data)
  if bank is not None:
    out["vq_bank"] = bank
  arrays, meta = read_features(data)
  if meta:
    out["features"] = dict(arrays, meta=meta)
  return out


def on_image_grid(rec: dict[str, Any], default_name: str) -> dict[str, Any]:
  """A decoded annotator record (``annotate.decode_record``) with its maps resized onto the
  image's grid. ``ArrayRecordSource`` and ``python -m mmsr_jax.precompute`` both read records
  through this function."""
  h, w = rec["image"].shape[:2]
  def onto(x, interp):
    if x is None or x.shape == (h, w):
      return x
    return cv2.resize(x, (w, h), interpolation=interp)
  return {"name": rec["meta"].get("name", default_name),
          "image": rec["image"],
          "depth": onto(rec["depth"], cv2.INTER_LINEAR),
          "seg": onto(rec["seg"], cv2.INTER_NEAREST),
          "caption": rec["caption"] or ""}


class ArrayRecordSource:
  """Records written by ``mmsr_jax.annotate``; maps are resized onto the image's grid.

  ``crops_only`` (training from the crop bank): records with crop images are returned undecoded
  (see :func:`training_record`)."""

  def __init__(self, path: str, crops_only: bool = False):
    self.path = path
    self.crops_only = bool(crops_only)
    self.files = list_shards(path, "config.data.path")
    self._ds = pygrain.ArrayRecordDataSource(self.files)

  def __len__(self) -> int:
    return len(self._ds)

  def raw(self, index: int) -> bytes:
    """The stored bytes of record ``index``."""
    return self._ds[int(index)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return training_record(self.raw(index), f"{self.path}[{int(index)}]", self.crops_only)
    except Exception as e:  # pylint: disable=broad-except
      raise BadImage(f"cannot decode annotation record: {e}") from e

  def __repr__(self) -> str:  # Grain checks a restored iterator's source by its repr
    return f"ArrayRecordSource({self.path!r}, n={len(self)}, crops_only={self.crops_only})"

  def __getstate__(self):
    return {"path": self.path, "crops_only": self.crops_only}

  def __setstate__(self, state):
    self.__init__(state["path"], state.get("crops_only", False))


class CheckedSource:
  """Skips, logs and counts bad records of ``inner``; stops when too many are bad."""

  def __init__(self, inner, min_size: int, max_bad_fraction: float,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    self.inner = inner
    self.min_size = int(min_size)
    self.max_pixels = int(max_pixels)  # also after decoding: TFDS and shards decode inside
    self.max_bad_fraction = float(max_bad_fraction)
    self.reads = 0
    self._seen: set[int] = set()
    self._bad: dict[int, tuple[str, str]] = {}  # index -> (name, reason), first read only
    self._lock = threading.Lock()  # Grain may read from several threads

  def __len__(self) -> int:
    return len(self.inner)

  def _name(self, index: int) -> str:
    if isinstance(self.inner, FolderSource):
      return self.inner.files[index]
    return f"{self.inner!r}[{index}]"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    try:
      rec = self.inner[index]
      h, w = rec["image"].shape[:2] if rec.get("image") is not None else rec["image_hw"]
      if min(h, w) < self.min_size:
        raise BadImage(f"too small: {h}x{w} < config.data.min_image_size={self.min_size}")
      if h * w > self.max_pixels:
        raise BadImage(f"too large: {h}x{w} = {h * w:,} pixels > config.data.max_image_pixels="
                       f"{self.max_pixels}")
      with self._lock:
        self.reads += 1
        self._seen.add(index)
      return rec
    except BadImage as e:
      name = self._name(index)
      with self._lock:
        self.reads += 1
        self._seen.add(index)
        first = index not in self._bad
        self._bad.setdefault(index, (name, str(e)))
        n_bad, n_seen = len(self._bad), len(self._seen)
      if first:
        logging.warning("skipping bad image %s: %s (%d bad of %d distinct images read)", name, e,
                        n_bad, n_seen)
      share = n_bad / n_seen
      if (n_seen >= MIN_CHECKED and share > self.max_bad_fraction) or (
          n_bad > self.max_bad_fraction * len(self)):
        examples = list(self._bad.values())[:3]
        raise ValueError(
            f"{n_bad} of {n_seen} distinct images read so far are bad ({share:.1%}; "
            f"config.data.max_bad_fraction={self.max_bad_fraction:.1%} of "
            f"{len(self)} images allowed), e.g. "
            + "; ".join(f"{n}: {r}" for n, r in examples)) from e
      return {"bad": str(e), "name": name}

  def __getstate__(self):  # for Grain worker processes: fresh counters, no lock
    return {"inner": self.inner, "min_size": self.min_size,
            "max_bad_fraction": self.max_bad_fraction, "max_pixels": self.max_pixels}

  def __setstate__(self, state):
    self.__init__(state["inner"], state["min_size"], state["max_bad_fraction"],
                  state.get("max_pixels", DEFAULT_MAX_PIXELS))

  def stats(self) -> dict[str, Any]:
    """Distinct images read (``seen``), bad ones and their paths, and all reads."""
    with self._lock:
      return {"seen": len(self._seen), "bad": len(self._bad), "reads": self.reads,
              "bad_paths": [n for n, _ in self._bad.values()]}

  def __repr__(self) -> str:
    return f"CheckedSource({self.inner!r})"


class DropBad(pygrain.FilterTransform):
  """Drops the ``{'bad': ...}`` records of a CheckedSource."""

  def filter(self, element: dict[str, Any]) -> bool:
    return "bad" not in element




class DemoSource:
  """Grain random-access data source over the demo records of one split.

  Pickles as just the split name (records are reloaded, from the in-process cache, in each
  worker), so it is cheap to ship to grain worker processes.
  """

  def __init__(self, split: str = "train"):
    self._split = split
    self._records = demo.load_demo_records(split)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[int(index)]

  def __repr__(self) -> str:
    return f"DemoSource(split={self._split!r}, n={len(self._records)})"

  def __getstate__(self) -> dict[str, Any]:
    return {"split": self._split}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["split"])


def make_source(config: ml_collections.ConfigDict, split: str = "train"):
  """The Grain data source that config.data.{source, path, ...} names.

  'demo': the built-in photos. 'folder': images under config.data.path (recursive). 'tfds':
  ``tfds.data_source(config.data.path, split=config.data.tfds_split)`` from
  config.data.tfds_data_dir. 'arrayrecord': annotate shards in config.data.path. Every source
  but the demo is wrapped in ``CheckedSource`` (bad images skipped and counted).
  """
  name = config.data.source
  if name == "demo":
    return DemoSource(split)
  d = config.data
  path = d.get("path", "")
  max_pixels = int(d.get("max_image_pixels", DEFAULT_MAX_PIXELS))
  if name == "folder":
    inner = FolderSource(path, max_pixels, caption_from_name=d.get("caption_from_name", ""))
  elif name == "tfds":
    inner = TfdsSource(path, split=d.get("tfds_split", "train"),
                               data_dir=d.get("tfds_data_dir", "") or None,
                               image_key=d.get("image_key", ""),
                               caption_key=d.get("caption_key", ""))
  else:
    # Training from the crop bank: a record's stored crop images replace its full image.
    from_bank = (config.get("vq", {}).get("ids_from") == "shards"
                 or config.get("autoencoder", {}).get("hr_latents_from") == "shards")
    inner = ArrayRecordSource(path, crops_only=split == "train" and from_bank)
  return CheckedSource(inner, min_size=int(d.get("min_image_size", 64)),
                               max_bad_fraction=float(d.get("max_bad_fraction", 0.05)),
                               max_pixels=max_pixels)


def per_process_batch_size(config: ml_collections.ConfigDict) -> int:
  """config.batch_size split over JAX processes; ValueError if it does not divide."""
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the number of JAX "
        f"processes ({n})")
  return config.batch_size // n
