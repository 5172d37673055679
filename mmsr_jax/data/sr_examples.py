"""SR training and held-out examples: random crops, degradation, modality maps and caption tokens,
and the deterministic, checkpointable Grain loader (example format: :func:`make_train_loader`).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zlib
from typing import Any, Protocol

import cv2
import grain.python as pygrain
import ml_dtypes
import ml_collections
import numpy as np

from mmsr_jax.data import demo, realesrgan, sources
from mmsr_jax.data.simple_degradation import simple_degrade
from mmsr_jax.data.modalities import (MODALITIES, canny_edges, operator_maps, render_crop_maps,
                                      render_map)
from mmsr_jax.formats.records import (HR_LATENTS_KEY, NULL_TEXT_FILE, TEXT_STATES_KEY,
                                      decode_crop, list_shards, read_crop_bank, read_crops,
                                      read_features)
from mmsr_jax.formats.fingerprint import encoder_fingerprint

EVAL_SEED = 1234
DEFAULT_EVAL_SIZE = 128


class CaptionTokenizer(Protocol):
  """What the pipeline needs from a caption tokenizer."""

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    ...


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


def _load_records(config: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
  """Held-out records: the images under config.data.eval_path for split 'val' when it is set,
  else the demo split (the held-out demo photos for every source)."""
  eval_path = config.data.get("eval_path", "")
  if split == "val" and eval_path:
    folder = sources.FolderSource(eval_path)
    records = []
    for i, path in enumerate(folder.files):
      try:
        records.append(dict(folder[i], name=os.path.relpath(path, eval_path)))
      except sources.BadImage as e:
        raise ValueError(f"config.data.eval_path image {path}: {e}") from e
    return records
  return demo.load_demo_records(split)


def _crop(x: np.ndarray | None, top: int, left: int, size: int) -> np.ndarray | None:
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


def context_example(maps: dict[str, np.ndarray], caption: str, *, map_size: int, text_len: int,
                    tokenizer: CaptionTokenizer,
                    rendered: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Rendered maps (zeros when absent), ``present`` and caption tokens; no LR-derived part.

  ``maps`` holds raw maps (rendered here); ``rendered`` maps already rendered at ``map_size``
  (``render_crop_maps``).
  """
  rendered = dict(rendered or {})
  for name in list(maps) + list(rendered):
    if name not in MODALITIES:
      raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
  for k, v in maps.items():
    if k in rendered:
      raise ValueError(f"map {k!r} given both raw and rendered")
    rendered[k] = render_map(k, v, map_size)
  ids, mask = tokenizer.encode(caption, text_len)
  return {
      **{k: (rendered[k] if k in rendered
             else np.zeros((map_size, map_size, 3), np.float32)) for k in MODALITIES},
      "present": np.array([k in rendered for k in MODALITIES], np.bool_),
      "text_ids": np.asarray(ids, np.int32).reshape(text_len),
      "text_mask": np.asarray(mask, np.int32).reshape(text_len),
  }


def conditioning_example(lr: np.ndarray, maps: dict[str, np.ndarray], caption: str, *,
                         map_size: int, text_len: int, tokenizer: CaptionTokenizer,
                         rendered: dict[str, np.ndarray] | None = None,
                         derive: tuple[str, ...] = ("edge",)) -> dict[str, np.ndarray]:
  """The model's conditioning for one LR image, shared by training and sampling.

  ``lr`` is float HxWx3 in [0, 1]; ``maps`` holds the raw modality maps that exist (``depth``
  HxW in [0, 1], ``seg`` HxW labels, ``edge`` HxW in [0, 1]); the missing maps named in
  ``derive`` are made from ``lr`` (edges by Canny, all three by ``operator_maps`` when
  ``config.data.maps_from='lr'``). Returns ``lr`` in [-1, 1], the rendered maps (zeros when
  absent), ``present`` and the caption's ``text_ids`` / ``text_mask``. ``rendered`` holds maps
  already rendered at ``map_size`` (``render_crop_maps``).
  """
  for name in maps:
    if name not in MODALITIES:
      raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
  if not set(derive) <= set(MODALITIES):
    raise ValueError(f"derive={derive!r}: expected names from {MODALITIES}")
  missing = [k for k in derive if k not in maps and k not in (rendered or {})]
  if missing == ["edge"]:
    maps = dict(maps, edge=canny_edges(lr, map_size))
  elif missing:
    made = operator_maps(lr, map_size)
    maps = dict(maps, **{k: made[k] for k in missing})
  example = {"lr": np.asarray(lr, np.float32) * np.float32(2.0) - np.float32(1.0)}
  example.update(context_example(maps, caption, map_size=map_size, text_len=text_len,
                                 tokenizer=tokenizer, rendered=rendered))
  return example


def _build_example(image: np.ndarray, rendered: dict[str, np.ndarray], caption: str,
                   rng: np.random.Generator, *, scale: int, map_size: int, text_len: int,
                   tokenizer: CaptionTokenizer, degradation: str = "simple",
                   maps_from: str = "record") -> dict[str, np.ndarray]:
  """Degrades an HR crop and assembles the example dict (see the module docstring);
  ``rendered`` holds the crop's depth / seg maps from ``render_crop_maps``. ``maps_from``
  (``config.data.maps_from``): 'lr' / 'hr' replace them and the edges with ``operator_maps``
  of the degraded LR / of the HR crop."""
  hr = image.astype(np.float32) / np.float32(255.0)
  if maps_from == "hr":
    rendered = {k: render_map(k, v, map_size) for k, v in operator_maps(image, map_size).items()}
  elif maps_from == "lr":
    rendered = {}
  if degradation == "simple":
    lr = simple_degrade(hr, rng, scale=scale)
  else:
    lr = realesrgan.RealESRGANDegrader(degradation, scale).degrade_one(hr, rng)
  example = conditioning_example(lr, {}, caption, map_size=map_size, text_len=text_len,
                                 tokenizer=tokenizer, rendered=rendered,
                                 derive=MODALITIES if maps_from == "lr" else ("edge",))
  example["hr"] = hr * np.float32(2.0) - np.float32(1.0)
  return example


IDS_FROM_SHARDS_NEEDS = (
    "config.vq.ids_from='shards' needs config.data.source='arrayrecord' with shards written by "
    "python -m mmsr_jax.precompute --crop_size=...")


class MakeTrainingExample(pygrain.RandomMapTransform):
  """Random crop + flip, degradation, modality maps and caption tokens for one record.

  All randomness comes from the ``rng`` grain hands to ``random_map`` (seeded per record index),
  so the output is a pure function of (seed, index).

  With ``ids_from='shards'`` the crop is one of the boxes of the record's token-id bank (written
  by ``python -m mmsr_jax.precompute --crop_size=hr_size``; ``sources.ArrayRecordSource`` passes it
  as ``'vq_bank'``), and the example gets that box's stored depth / seg ids as ``'vq_ids'``.
  A record with crop images (``'crops'``, see ``formats.records``) gives that box's stored crop
  and maps instead of a full image to cut it from: the same example, one small decode.
  """

  def __init__(self, hr_size: int, scale: int, map_size: int, text_len: int,
               tokenizer: CaptionTokenizer, degradation: str = "simple", ids_from: str = "encoder",
               vq_grid: int | None = None, maps_from: str = "record",
               text_from_shards: bool = False, latents_from_shards: bool = False):
    self.degradation = degradation
    self.maps_from = maps_from
    self.hr_size = int(hr_size)
    self.scale = int(scale)
    self.map_size = int(map_size)
    self.text_len = int(text_len)
    self.tokenizer = tokenizer
    self.ids_from = ids_from
    self.vq_grid = None if vq_grid is None else int(vq_grid)
    self.text_from_shards, self.latents_from_shards = text_from_shards, latents_from_shards
    # Precomputed features belong to the crop bank's boxes: the crop is one of them.
    self.from_bank = ids_from == "shards" or latents_from_shards

  def _bank(self, element: dict[str, Any]) -> dict[str, Any]:
    bank = element.get("vq_bank")
    name = element.get("name", "?")
    if bank is None:
      raise ValueError(f"record {name!r} has no token-id crop bank: "
                       f"{IDS_FROM_SHARDS_NEEDS}")
    check_bank_meta(bank["meta"], self.hr_size, self.map_size, self.vq_grid,
                    where=f"record {name!r}")
    return bank

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = self.hr_size
    crops = element.get("crops") if self.from_bank else None
    if crops is not None:
      check_crops_meta(crops["meta"], s, len(self._bank(element)["boxes"]),
                       where=f"record {element.get('name', '?')!r}")
      h, w = crops["meta"]["grid_hw"]
    else:
      rec = resize_min_side(element, self.hr_size)
      h, w = rec["image"].shape[:2]
    vq_ids = None
    if self.from_bank:
      bank = self._bank(element)
      box = int(rng.integers(0, len(bank["boxes"])))
      top, left = (int(v) for v in bank["boxes"][box])
      if not (0 <= top <= h - s and 0 <= left <= w - s):
        raise ValueError(f"record {element.get('name', '?')!r}: crop bank box ({top}, {left}) "
                         f"of side {s} lies outside the {h}x{w} image; precompute these shards "
                         "again")
    else:
      top = int(rng.integers(0, h - s + 1))
      left = int(rng.integers(0, w - s + 1))
    flip = bool(rng.random() < 0.5)
    if self.ids_from == "shards":
      vq_ids = bank["ids"][box, int(flip)].astype(np.int32)  # 0 where absent and for edge
    if crops is not None:  # the box's own crop and maps: a record whose frame is the box
      rec, top, left = dict(decode_crop(crops, box), caption=element["caption"]), 0, 0
    image = _crop(rec["image"], top, left, s)
    if flip:
      image = image[:, ::-1]
    rendered = render_crop_maps(rec, top, left, s, flip, self.map_size)
    if self.degradation != "simple":
      ex = self._hr_and_params(image, rendered, rec["caption"], rng)
    else:
      ex = _build_example(np.ascontiguousarray(image), rendered, rec["caption"], rng,
                          scale=self.scale, map_size=self.map_size, text_len=self.text_len,
                          tokenizer=self.tokenizer, maps_from=self.maps_from)
    if vq_ids is not None:
      ex["vq_ids"] = vq_ids
    if self.latents_from_shards:
      ex["hr_latent"] = stored_array(element["features"], HR_LATENTS_KEY)[box, int(flip)]
    if self.text_from_shards:
      ex["text_states"] = padded_text_states(element["features"], ex["text_mask"],
                                             where=element.get("name", "?"))
    return ex

  def _hr_and_params(self, image, rendered, caption, rng):
    """HR crop, context maps and tokens, and the sampled degradation parameters (``deg_*``);
    ``DegradingIterator`` turns them into 'lr' and 'edge' batch-wise."""
    maps = {"edge": np.zeros((1, 1), np.float32)}  # placeholder: computed from the LR later
    ex = context_example(maps, caption, map_size=self.map_size, text_len=self.text_len,
                         tokenizer=self.tokenizer, rendered=rendered)
    ex["hr"] = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    params = realesrgan.sample_params(rng, image.shape[:2], realesrgan.get_preset(
        self.degradation), self.scale)
    ex.update({f"deg_{k}": v for k, v in params.items()})
    return ex


def check_crops_meta(meta: dict[str, Any], hr_size: int, boxes: int, *, where: str) -> None:
  """ValueError unless a record's crop images belong to its bank at the config's crop size."""
  if int(meta["crop_size"]) != hr_size or int(meta["boxes"]) != boxes:
    raise ValueError(f"{where}: {meta['boxes']} crop images of {meta['crop_size']}px do not match "
                     f"its crop bank ({boxes} boxes) at config.data.hr_size={hr_size}; run "
                     f"python -m mmsr_jax.precompute --crop_size={hr_size} again")


def check_bank_meta(meta: dict[str, Any], hr_size: int, map_size: int, grid: int | None, *,
                    where: str) -> None:
  """ValueError unless a crop bank's ``vq_meta`` matches the DiT config's sizes."""
  crop = int(meta.get("crop_size", 0))
  if crop != hr_size:
    raise ValueError(f"{where}: token-id crop bank of {crop}px crops != config.data.hr_size="
                     f"{hr_size}; run python -m mmsr_jax.precompute --crop_size={hr_size}")
  if int(meta["map_size"]) != map_size:
    raise ValueError(f"{where}: shards tokenized at map_size={meta['map_size']} != "
                     f"config.data.map_size={map_size}; tokenize with a tokenizer trained at "
                     f"map_size={map_size}")
  if grid is not None and int(meta["grid"]) != grid:
    raise ValueError(f"{where}: token grid {meta['grid']}x{meta['grid']} != the model's "
                     f"{grid}x{grid} (config.vq.arch); tokenize with the tokenizer the config "
                     "uses")


class DegradingIterator:
  """Wraps a Grain loader iterator: applies the Real-ESRGAN degradation (jitted blur / resize /
  noise on the default device, JPEG on the host) to each batch and adds 'lr' and 'edge'.

  With ``prefetch > 0`` a background thread prepares that many batches ahead, so the host JPEG
  and the device degradation overlap the train step. ``get_state`` returns the Grain state just
  after the last batch *returned* (not the prefetched ones), so a checkpoint resumes on the next
  unseen example; ``set_state`` restarts the prefetching from there.
  """

  def __init__(self, it, degrader: realesrgan.RealESRGANDegrader, map_size: int,
               prefetch: int = 2):
    self._it = it
    self._degrader = degrader
    self._map_size = int(map_size)
    self._prefetch = int(prefetch)
    self._state = it.get_state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = dict(batch)
    params = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("deg_")}
    hr = (batch["hr"] + np.float32(1.0)) * np.float32(0.5)
    lr = self._degrader(hr, params)
    batch["lr"] = lr * np.float32(2.0) - np.float32(1.0)
    batch["edge"] = np.stack([render_map("edge", canny_edges(x, self._map_size),
                                         self._map_size) for x in lr])
    return batch

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        item = (self.process(batch), self._it.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch <= 0:
      out = self.process(next(self._it))
      self._state = self._it.get_state()
      return out
    if self._thread is None:
      self._stop.clear()
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._thread = threading.Thread(target=self._produce, daemon=True,
                                      name="degrade-prefetch")
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._halt()
      raise item
    out, self._state = item
    return out

  def close(self) -> None:
    """Stops the prefetch thread (the wrapped iterator's workers stop when it is dropped)."""
    self._halt()

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass
      self._thread = None

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._halt()
    self._it.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    """Called by Grain's checkpoint handler after a restore; prefetching starts on demand."""


class DegradedLoader:
  """An iterable over degraded batches (see ``DegradingIterator``)."""

  def __init__(self, loader: pygrain.DataLoader, degrader: realesrgan.RealESRGANDegrader,
               map_size: int, prefetch: int):
    self.loader = loader
    self.degrader = degrader
    self.map_size = map_size
    self.prefetch = prefetch

  def __iter__(self) -> DegradingIterator:
    return DegradingIterator(iter(self.loader), self.degrader, self.map_size, self.prefetch)


def make_train_loader(config: ml_collections.ConfigDict, tokenizer: CaptionTokenizer):
  """The infinite, shuffled, per-process-sharded training loader (``get_state`` / ``set_state``
  on its iterator; saved with the checkpoints).

  Batches of examples (numpy; S = hr size, M = map size, L = text length): ``hr`` [S, S, 3] and
  ``lr`` [S/scale, S/scale, 3] in [-1, 1]; ``depth`` / ``seg`` / ``edge`` [M, M, 3] in [-1, 1]
  (zeros when absent); ``present`` bool [3]; ``text_ids`` / ``text_mask`` int32 [L]; with
  ``config.vq.ids_from='shards'`` also ``vq_ids`` int32 [3, g, g] from the record's crop bank
  (edge slot 0: edges are tokenized every step). Every example is a pure function of (seed,
  global record index), so batches repeat for the same seed and worker count. The Real-ESRGAN
  presets draw their parameters here and a ``DegradedLoader`` applies them batch-wise.
  """
  source_name = config.data.source
  degradation = config.data.degradation
  batch = sources.per_process_batch_size(config)
  ids_from = config.vq.ids_from
  source = sources.make_source(config, "train")
  vq_grid = None
  text_shards = config.text.states_from == "shards"
  latent_shards = config.autoencoder.hr_latents_from == "shards"
  if ids_from == "shards" or text_shards or latent_shards:
    vq_grid = check_precomputed(config, source)
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
      degradation=degradation,
      ids_from=ids_from,
      vq_grid=vq_grid,
      text_from_shards=text_shards,
      latents_from_shards=latent_shards,
      maps_from=config.data.get("maps_from", "record"),
  )
  ops = [] if source_name == "demo" else [sources.DropBad()]
  loader = pygrain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=ops + [transform, pygrain.Batch(batch, drop_remainder=True)],
      worker_count=int(config.data.get("num_workers", 0)),
  )
  if degradation == "simple":
    return loader
  return DegradedLoader(loader, realesrgan.RealESRGANDegrader(degradation, config.data.scale),
                        config.data.map_size, int(config.data.get("prefetch", 2)))


def stored_array(features: dict[str, Any], key: str) -> np.ndarray:
  """A precomputed feature as stored (bfloat16 is kept as its uint16 bits)."""
  arr = features[key]
  if features["meta"][key]["dtype"] == "bfloat16":
    arr = arr.view(ml_dtypes.bfloat16)
  return arr


def padded_text_states(features: dict[str, Any], mask: np.ndarray, *, where: str) -> np.ndarray:
  """A record's stored caption states (its real tokens) padded with zeros to the mask's length;
  the padded positions are masked out of every attention, so zeros change nothing."""
  states = stored_array(features, TEXT_STATES_KEY)
  if len(states) != int(np.sum(mask)):
    raise ValueError(f"record {where!r}: {len(states)} stored caption states but the caption "
                     f"has {int(np.sum(mask))} tokens; precompute with the config's tokenizer")
  out = np.zeros((len(mask), states.shape[1]), states.dtype)
  out[:len(states)] = states
  return out


def read_null_text(config) -> tuple[np.ndarray, np.ndarray]:
  """The empty caption's states ``[L, D]`` (float32) and mask ``[L]`` that the precompute pass
  wrote beside the shards (condition dropout gives them to a dropped caption)."""
  path = os.path.join(_shard_folder(config.data.path), NULL_TEXT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: config.text.states_from='shards' needs the "
                            "folder written by python -m mmsr_jax.precompute")
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(z["meta"].tobytes().decode("utf-8"))
    states, mask = z["states"], z["mask"]
  _check_text_meta(meta, config, where=path)
  if meta["dtype"] == "bfloat16":
    states = states.view(ml_dtypes.bfloat16)
  return np.asarray(states, np.float32), np.asarray(mask, np.int32)


def _shard_folder(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(list_shards(path, "config.data.path")[0])


def _check_text_meta(meta: dict, config, *, where: str) -> None:
  want = {"fingerprint": encoder_fingerprint(config, "text"), "tokenizer": config.text.tokenizer,
          "max_length": int(config.text.max_length),
          "d_model": int(config.text.encoder.d_model)}
  for key, value in want.items():
    if meta.get(key) != value:
      raise ValueError(f"{where}: caption states written with text {key} {meta.get(key)!r} but "
                       f"the config's is {value!r}; run python -m mmsr_jax.precompute with this "
                       "config, or set config.text.states_from='encoder'")


def _check_latent_meta(meta: dict, config, *, where: str) -> None:
  lat = int(config.data.hr_size) // int(config.autoencoder.factor)
  want = {"fingerprint": encoder_fingerprint(config, "ae"),
          "crop_size": int(config.data.hr_size),
          "scaling_factor": float(config.autoencoder.scaling_factor),
          "shift_factor": float(config.autoencoder.get("shift_factor", 0.0) or 0.0)}
  for key, value in want.items():
    if meta.get(key) != value:
      raise ValueError(f"{where}: HR latents written with autoencoder {key} {meta.get(key)!r} "
                       f"but the config's is {value!r}; run python -m mmsr_jax.precompute with "
                       "this config, or set config.autoencoder.hr_latents_from='encoder'")
  if tuple(meta["shape"][-3:-1]) != (lat, lat):
    raise ValueError(f"{where}: HR latents of {meta['shape'][-3:-1]} != the config's {lat}x{lat}")


def check_precomputed(config: ml_collections.ConfigDict, source) -> int | None:
  """Checks, before training starts, that the first record of ``source`` (an 'arrayrecord'
  source of precompute shards) holds what the config reads from shards, written by the encoders
  the config names (their fingerprints) at its sizes. Returns the token grid (ids from shards)."""
  inner = source.inner if isinstance(source, sources.CheckedSource) else source
  first = f"{inner.files[0]} record 0"
  data = inner.raw(0)
  grid = bank = None
  if config.vq.ids_from == "shards" or config.autoencoder.hr_latents_from == "shards":
    bank = read_crop_bank(data)
    if bank is None:
      raise ValueError(f"{first} has no crop bank: {IDS_FROM_SHARDS_NEEDS}")
    meta = bank["meta"]
    grid = int(config.data.map_size) // 2 ** (len(config.vq.arch.block_out_channels) - 1)
    check_bank_meta(meta, int(config.data.hr_size), int(config.data.map_size), grid, where=first)
  if config.vq.ids_from == "shards":
    if bool(meta.get("per_modality", False)) != bool(config.vq.per_modality):
      raise ValueError(f"{first}: tokenized with per_modality={meta.get('per_modality')} but "
                       f"config.vq.per_modality={config.vq.per_modality}")
    have = encoder_fingerprint(config, "vq")
    if have != meta["tokenizer_sha256"]:
      raise ValueError(f"config.vq.params={config.vq.params!r} (fingerprint {have[:16]}...) is "
                       f"not the tokenizer {first} was tokenized with "
                       f"({meta['tokenizer_sha256'][:16]}...); the edge ids are encoded every "
                       "step, so it must be that tokenizer")
  else:
    grid = None
  crops = read_crops(data)
  if crops is not None and bank is not None:
    check_crops_meta(crops["meta"], int(config.data.hr_size), len(bank["boxes"]), where=first)
  features, fmeta = read_features(data)
  for field, key, check in (("text.states_from", TEXT_STATES_KEY, _check_text_meta),
                            ("autoencoder.hr_latents_from", HR_LATENTS_KEY, _check_latent_meta)):
    node = config
    for part in field.split("."):
      node = node[part]
    if node != "shards":
      continue
    if key not in features:
      raise ValueError(f"{first} has no {key!r}: config.{field}='shards' needs shards written "
                       "by python -m mmsr_jax.precompute with that feature")
    check(fmeta[key], config, where=first)
  return grid


def _eval_seed(name: str) -> np.random.Generator:
  return np.random.default_rng([EVAL_SEED, zlib.crc32(name.encode("utf-8"))])


def make_eval_examples(config: ml_collections.ConfigDict, tokenizer: CaptionTokenizer,
                       split: str = "val") -> list[dict[str, Any]]:
  """Deterministic evaluation examples: one center crop per image of ``split``.

  The crop side is config.data.eval_size (default 128) clamped to the image's short side and
  rounded down to a multiple of config.data.scale. Each image is degraded with a fixed seed
  derived from its name (independent of config.seed), so every run sees the same LR inputs.

  Returns:
    A list of example dicts (unbatched; format as in training, with 'hr' [E, E, 3] and
    'lr' [E/scale, E/scale, 3]) plus 'name' and 'caption'.
  """
  degradation = config.data.degradation
  scale = int(config.data.scale)
  eval_size = int(config.data.get("eval_size", DEFAULT_EVAL_SIZE))
  examples = []
  for rec in _load_records(config, split):
    h, w = rec["image"].shape[:2]
    e = (min(eval_size, h, w) // scale) * scale
    if e <= 0:
      raise ValueError(f"image {rec['name']!r} ({h}x{w}) is smaller than scale={scale}")
    top, left = (h - e) // 2, (w - e) // 2
    ex = _build_example(
        np.ascontiguousarray(_crop(rec["image"], top, left, e)),
        render_crop_maps(rec, top, left, e, False, int(config.data.map_size)),
        rec["caption"], _eval_seed(rec["name"]), scale=scale,
        map_size=int(config.data.map_size), text_len=int(config.text.max_length),
        tokenizer=tokenizer, degradation=degradation,
        maps_from=config.data.get("maps_from", "record"))
    ex["name"] = rec["name"]
    ex["caption"] = rec["caption"]
    examples.append(ex)
  return examples
