"""Training examples of the VQ tokenizers: rendered depth / seg / edge maps of random crops (from
annotator shards or the demo photos), synthetic maps where configured, and the fixed held-out
maps of the report."""

from __future__ import annotations

import zlib
from typing import Any

import cv2
import grain.python as pygrain
import numpy as np

from mmsr_jax.data import demo, photo_maps
from mmsr_jax.data.modalities import MODALITIES, canny, crop_maps, render_map
from mmsr_jax.data.sources import DemoSource, per_process_batch_size
from mmsr_jax.data.synthetic import synthetic_map
from mmsr_jax.formats.records import decode_record, list_shards

SOURCES = ("demo", "synthetic", "shards", "folder")


EVAL_SEED = 4321


def _edge_of(image: np.ndarray, size: int) -> np.ndarray:
  """Canny edges of an RGB crop after resizing it to ``size`` (area when shrinking)."""
  h = image.shape[0]
  interp = cv2.INTER_AREA if h >= size else cv2.INTER_CUBIC
  small = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
  return canny(small)


def record_maps(record: dict[str, Any], top: int, left: int, side: int, flip: bool,
                size: int) -> dict[str, np.ndarray]:
  """The raw maps of one crop of a record (:func:`crop_maps`); without a stored edge map the
  edges are Canny on the image crop resized to ``size``."""
  out = crop_maps(record, top, left, side, flip)
  image = record.get("image")
  if "edge" not in out and image is not None:
    edge = _edge_of(image[top:top + side, left:left + side], size)
    out["edge"] = np.ascontiguousarray(edge[:, ::-1] if flip else edge)
  return out


class ShardRecords:
  """Random-access annotator records (``mmsr_jax.annotate`` ArrayRecord shards) of one split.

  Every ``heldout_every``-th record (by global index) is held out; the rest train.
  """

  def __init__(self, pattern: str, split: str, heldout_every: int):
    self._pattern, self._split, self._every = pattern, split, int(heldout_every)
    files = list_shards(pattern, "config.vq_train.shards")
    self._source = pygrain.ArrayRecordDataSource(files)
    n = len(self._source)
    held = np.arange(0, n, self._every)
    self._index = held if split == "val" else np.setdiff1d(np.arange(n), held)
    if len(self._index) == 0:
      raise ValueError(f"config.vq_train.shards={pattern!r}: no {split} records "
                       f"({n} records, heldout_every={heldout_every})")

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_record(self._source[int(self._index[int(i)])])

  def __repr__(self) -> str:  # grain checks the source of a restored iterator by its repr
    return (f"ShardRecords(pattern={self._pattern!r}, split={self._split!r}, "
            f"heldout_every={self._every})")

  def __getstate__(self):
    return {"pattern": self._pattern, "split": self._split, "every": self._every}

  def __setstate__(self, s):
    self.__init__(s["pattern"], s["split"], s["every"])


class SyntheticRecords:
  """A source of empty records: every map of every example is synthetic."""

  def __init__(self, n: int = 1 << 20):
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {}

  def __repr__(self) -> str:  # grain checks the source of a restored iterator by its repr
    return f"SyntheticRecords(n={self._n})"


class MakeMapsExample(pygrain.RandomMapTransform):
  """A record -> ``{'maps': [3, M, M, 3] in [-1, 1], 'present': bool [3]}`` (random crop, flip,
  synthetic maps where configured). All randomness comes from grain's per-record ``rng``."""

  def __init__(self, size: int, synthetic_fraction: float, synthetic_for_missing: bool):
    self.size, self.frac, self.fill = int(size), float(synthetic_fraction), bool(synthetic_for_missing)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw = {}
    if record:
      image = record.get("image")
      h, w = image.shape[:2] if image is not None else next(
          record[k].shape for k in MODALITIES if record.get(k) is not None)
      short = min(h, w)
      side = int(rng.integers(min(self.size, short), short + 1))
      top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
      raw = record_maps(record, top, left, side, bool(rng.random() < 0.5), self.size)
    maps, present = [], []
    for k in MODALITIES:
      use_synth = (k not in raw and self.fill) or (k in raw and rng.random() < self.frac)
      m = synthetic_map(k, rng, self.size) if use_synth else raw.get(k)
      present.append(m is not None)
      maps.append(render_map(k, m, self.size) if m is not None
                  else np.zeros((self.size, self.size, 3), np.float32))
    return {"maps": np.stack(maps), "present": np.asarray(present, np.bool_)}


def _train_source(config):
  vt = config.vq_train
  if vt.source == "demo":
    return DemoSource("train")
  if vt.source == "synthetic":
    return SyntheticRecords()
  if vt.source == "folder":
    return photo_maps.train_source(config)
  return ShardRecords(vt.shards, "train", vt.heldout_every)


def make_loader(config) -> pygrain.DataLoader:
  """Infinite, shuffled, per-process-sharded loader of map batches (checkpointable iterator)."""
  vt = config.vq_train
  source = _train_source(config)
  sampler = pygrain.IndexSampler(
      num_records=len(source), shard_options=pygrain.ShardByJaxProcess(drop_remainder=True),
      shuffle=True, num_epochs=None, seed=int(config.seed))
  transform = (photo_maps.transform(config) if vt.source == "folder" else
               MakeMapsExample(config.data.map_size, vt.synthetic_fraction,
                               vt.synthetic_for_missing))
  return pygrain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[transform, pygrain.Batch(per_process_batch_size(config), drop_remainder=True)],
      worker_count=int(config.data.num_workers))


def heldout_maps(config) -> dict[str, dict[str, Any]]:
  """The held-out maps of the report, per modality: ``{'maps': [N, M, M, 3], 'origin': str}``.

  Deterministic (fixed seeds, independent of ``config.seed``): real maps of the held-out records
  (the demo's validation photos, or every ``heldout_every``-th shard record) at ``eval_crops``
  crops each, plus ``eval_synthetic`` synthetic maps per modality.
  """
  vt, size = config.vq_train, int(config.data.map_size)
  if vt.source == "folder":
    return photo_maps.heldout_maps(config)
  real: dict[str, list[np.ndarray]] = {k: [] for k in MODALITIES}
  if vt.source == "demo":
    records = demo.load_demo_records("val")
  elif vt.source == "shards":
    src = ShardRecords(vt.shards, "val", vt.heldout_every)
    records = [src[i] for i in range(min(len(src), 256))]
  else:
    records = []
  for r_i, rec in enumerate(records):
    rng = np.random.default_rng([EVAL_SEED, r_i])
    image = rec.get("image")
    h, w = image.shape[:2]
    short = min(h, w)
    for c in range(int(vt.eval_crops)):
      side = short if c == 0 else int(rng.integers(min(size, short), short + 1))
      top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
      for k, m in record_maps(rec, top, left, side, c % 2 == 1, size).items():
        real[k].append(render_map(k, m, size))
  out = {}
  for k in MODALITIES:
    rng = np.random.default_rng([EVAL_SEED, zlib.crc32(k.encode())])
    synth = [render_map(k, synthetic_map(k, rng, size), size)
             for _ in range(int(vt.eval_synthetic))]
    maps = real[k] + synth
    if not maps:
      continue
    origin = f"{len(real[k])} real ({vt.source} held-out), {len(synth)} synthetic"
    out[k] = {"maps": np.stack(maps).astype(np.float32), "origin": origin,
              "num_real": len(real[k]), "num_synthetic": len(synth)}
  return out
