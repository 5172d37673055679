"""Grain input pipeline for the demo data: crops, degradation, modality maps, captions.

Training examples come from a ``grain.python.DataLoader`` sharded per JAX process. The random
transform draws everything from the per-record generator that grain's ``IndexSampler`` derives
from ``config.seed`` and the global record index, so the batches are reproducible and the
iterator state (``get_state`` / ``set_state``) is enough to resume exactly. Save that state with
Orbax through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (aliases:
``grain.python.PyGrainCheckpointSave`` / ``PyGrainCheckpointRestore``).

Example dict (numpy), S = hr size, M = map size, L = text length:

* ``'hr'``: float32 [S, S, 3] in [-1, 1]
* ``'lr'``: float32 [S/scale, S/scale, 3] in [-1, 1]
* ``'depth'``, ``'seg'``, ``'edge'``: float32 [M, M, 3] in [-1, 1] (zeros when absent)
* ``'present'``: bool [3], order (depth, seg, edge); edge is always present
* ``'text_ids'``, ``'text_mask'``: int32 [L]

Evaluation examples (``make_eval_examples``) add ``'name'`` and ``'caption'`` (str).
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

import cv2
import grain.python as pygrain
import jax
import ml_collections
import numpy as np

from mmsr_jax.data import demo
from mmsr_jax.data.degrade import simple_degrade
from mmsr_jax.data.modalities import MODALITIES, canny_edges, render_map

ALLOWED_SOURCES: tuple[str, ...] = ("demo",)
EVAL_SEED = 1234
DEFAULT_EVAL_SIZE = 128


class Tokenizer(Protocol):
  """What the pipeline needs from a caption tokenizer."""

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    ...


def _check_source(config: ml_collections.ConfigDict) -> str:
  source = config.data.source
  if source not in ALLOWED_SOURCES:
    raise ValueError(
        f"config.data.source={source!r} is not supported by this pipeline; allowed values: "
        f"{ALLOWED_SOURCES}")
  return source


def _load_records(source: str, split: str) -> list[dict[str, Any]]:
  if source == "demo":
    return demo.load_demo_records(split)
  raise ValueError(f"config.data.source={source!r}; allowed values: {ALLOWED_SOURCES}")


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


def _resize_min_side(record: dict[str, Any], min_side: int) -> dict[str, Any]:
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


def _crop(x: np.ndarray | None, top: int, left: int, size: int) -> np.ndarray | None:
  return None if x is None else x[top:top + size, left:left + size]


def conditioning_example(lr: np.ndarray, maps: dict[str, np.ndarray], caption: str, *,
                         map_size: int, text_len: int,
                         tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """The model's conditioning for one LR image, shared by training and sampling.

  ``lr`` is float HxWx3 in [0, 1]; ``maps`` holds the raw modality maps that exist (``depth``
  HxW in [0, 1], ``seg`` HxW labels, ``edge`` HxW in [0, 1]); a missing edge map is computed by
  Canny on ``lr``. Returns ``lr`` in [-1, 1], the rendered maps (zeros when absent), ``present``
  and the caption's ``text_ids`` / ``text_mask``.
  """
  for name in maps:
    if name not in MODALITIES:
      raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
  if "edge" not in maps:
    maps = dict(maps, edge=canny_edges(lr, map_size))
  ids, mask = tokenizer.encode(caption, text_len)
  example = {
      "lr": np.asarray(lr, np.float32) * np.float32(2.0) - np.float32(1.0),
      **{k: (render_map(k, maps[k], map_size) if k in maps
             else np.zeros((map_size, map_size, 3), np.float32)) for k in MODALITIES},
      "present": np.array([k in maps for k in MODALITIES], np.bool_),
      "text_ids": np.asarray(ids, np.int32).reshape(text_len),
      "text_mask": np.asarray(mask, np.int32).reshape(text_len),
  }
  return example


def _build_example(image: np.ndarray, depth: np.ndarray | None, seg: np.ndarray | None,
                   caption: str, rng: np.random.Generator, *, scale: int, map_size: int,
                   text_len: int, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """Degrades an HR crop and assembles the example dict (see the module docstring)."""
  hr = image.astype(np.float32) / np.float32(255.0)
  lr = simple_degrade(hr, rng, scale=scale)
  maps = {k: v for k, v in (("depth", depth), ("seg", seg)) if v is not None}
  example = conditioning_example(lr, maps, caption, map_size=map_size, text_len=text_len,
                                 tokenizer=tokenizer)
  example["hr"] = hr * np.float32(2.0) - np.float32(1.0)
  return example


class MakeTrainingExample(pygrain.RandomMapTransform):
  """Random crop + flip, degradation, modality maps and caption tokens for one record.

  All randomness comes from the ``rng`` grain hands to ``random_map`` (seeded per record index),
  so the output is a pure function of (seed, index).
  """

  def __init__(self, hr_size: int, scale: int, map_size: int, text_len: int,
               tokenizer: Tokenizer):
    if hr_size % scale:
      raise ValueError(f"config.data.hr_size={hr_size} is not divisible by scale={scale}")
    self.hr_size = int(hr_size)
    self.scale = int(scale)
    self.map_size = int(map_size)
    self.text_len = int(text_len)
    self.tokenizer = tokenizer

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    rec = _resize_min_side(element, self.hr_size)
    h, w = rec["image"].shape[:2]
    s = self.hr_size
    top = int(rng.integers(0, h - s + 1))
    left = int(rng.integers(0, w - s + 1))
    flip = bool(rng.random() < 0.5)
    image = _crop(rec["image"], top, left, s)
    depth = _crop(rec.get("depth"), top, left, s)
    seg = _crop(rec.get("seg"), top, left, s)
    if flip:
      image = image[:, ::-1]
      depth = None if depth is None else depth[:, ::-1]
      seg = None if seg is None else seg[:, ::-1]
    return _build_example(
        np.ascontiguousarray(image), None if depth is None else np.ascontiguousarray(depth),
        None if seg is None else np.ascontiguousarray(seg), rec["caption"], rng,
        scale=self.scale, map_size=self.map_size, text_len=self.text_len,
        tokenizer=self.tokenizer)


def per_process_batch_size(config: ml_collections.ConfigDict) -> int:
  """config.batch_size split over JAX processes; ValueError if it does not divide."""
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the number of JAX "
        f"processes ({n})")
  return config.batch_size // n


def make_train_loader(config: ml_collections.ConfigDict,
                      tokenizer: Tokenizer) -> pygrain.DataLoader:
  """Builds the infinite, shuffled, per-process-sharded training loader.

  ``iter(loader)`` yields batched example dicts (leading axis = per-process batch) and supports
  ``get_state()`` / ``set_state()``; checkpoint it with Orbax via
  ``grain.checkpoint.CheckpointSave(iterator)`` / ``grain.checkpoint.CheckpointRestore(iterator)``.

  Reads config.seed, config.batch_size, config.data.{source, hr_size, scale, map_size,
  num_workers} and config.text.max_length.

  Batches are identical across runs for the same seed *and* the same num_workers (with workers,
  grain batches each worker's slice of the index stream, so the order changes with the count).
  num_workers > 0 needs absl flags parsed (i.e. run under ``absl.app.run``), a grain requirement.
  """
  source_name = _check_source(config)
  batch = per_process_batch_size(config)
  if source_name == "demo":
    source = DemoSource("train")
  else:  # pragma: no cover - _check_source already rejected it
    raise ValueError(f"config.data.source={source_name!r}; allowed values: {ALLOWED_SOURCES}")
  sampler = pygrain.IndexSampler(
      num_records=len(source),
      shard_options=pygrain.ShardByJaxProcess(drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=int(config.seed),
  )
  transform = MakeTrainingExample(
      hr_size=config.data.hr_size,
      scale=config.data.scale,
      map_size=config.data.map_size,
      text_len=config.text.max_length,
      tokenizer=tokenizer,
  )
  return pygrain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=[transform, pygrain.Batch(batch, drop_remainder=True)],
      worker_count=int(config.data.get("num_workers", 0)),
  )


def _eval_seed(name: str) -> np.random.Generator:
  return np.random.default_rng([EVAL_SEED, zlib.crc32(name.encode("utf-8"))])


def make_eval_examples(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                       split: str = "val") -> list[dict[str, Any]]:
  """Deterministic evaluation examples: one center crop per image of ``split``.

  The crop side is config.data.eval_size (default 128) clamped to the image's short side and
  rounded down to a multiple of config.data.scale. Each image is degraded with a fixed seed
  derived from its name (independent of config.seed), so every run sees the same LR inputs.

  Returns:
    A list of example dicts (unbatched; format as in training, with 'hr' [E, E, 3] and
    'lr' [E/scale, E/scale, 3]) plus 'name' and 'caption'.
  """
  source_name = _check_source(config)
  scale = int(config.data.scale)
  eval_size = int(config.data.get("eval_size", DEFAULT_EVAL_SIZE))
  examples = []
  for rec in _load_records(source_name, split):
    h, w = rec["image"].shape[:2]
    e = (min(eval_size, h, w) // scale) * scale
    if e <= 0:
      raise ValueError(f"image {rec['name']!r} ({h}x{w}) is smaller than scale={scale}")
    top, left = (h - e) // 2, (w - e) // 2
    ex = _build_example(
        np.ascontiguousarray(_crop(rec["image"], top, left, e)),
        None if rec.get("depth") is None else np.ascontiguousarray(
            _crop(rec["depth"], top, left, e)),
        None if rec.get("seg") is None else np.ascontiguousarray(_crop(rec["seg"], top, left, e)),
        rec["caption"], _eval_seed(rec["name"]), scale=scale,
        map_size=int(config.data.map_size), text_len=int(config.text.max_length),
        tokenizer=tokenizer)
    ex["name"] = rec["name"]
    ex["caption"] = rec["caption"]
    examples.append(ex)
  return examples
