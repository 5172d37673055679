"""The offline encoder pass over annotated shards (``python -m mmsr_jax.precompute``): writes into
each record what the SR trainer can then read instead of running a frozen encoder in every step:
the VQ token ids of its maps, and for the boxes of a crop bank (unflipped and mirrored, made by
the same functions as the training pipeline) the depth / seg ids and the VAE latents (posterior
mean, scaled as the diffusion sees it) of the HR crop; and the T5 states of its caption (the
real tokens only); and the bank boxes' HR crops (and depth / seg crops) re-encoded on their own,
so the trainer decodes one crop instead of the whole photo (format in ``formats/records.py``).
The features carry the fingerprint of the encoder that wrote them. Shards are written to a
temporary name and renamed when complete."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from mmsr_jax.data import sources
from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.data.crops import crop_bank_boxes, resize_min_side
from mmsr_jax.data.modalities import MODALITIES, canny, render_crop_maps, render_map
from mmsr_jax.formats.fingerprint import encoder_fingerprint, weights_fingerprint
from mmsr_jax.formats.records import (CROP_ENCODINGS, HR_LATENTS_KEY, MANIFEST, NULL_TEXT_FILE,
                                      TEXT_STATES_KEY, add_crops, add_features, add_ids,
                                      decode_crop_image, decode_record, encode_crop_image,
                                      encode_crop_map, list_shards)
from mmsr_jax.models import build
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.system import frozen_params
from mmsr_jax.training.vq_report import EXPORT_FILE
from mmsr_jax.weights import params_io

FEATURES = ("vq", "text", "latents", "crops")
SUMMARY_FILE = "precompute.json"  # beside the shards: settings, fingerprints, counts
STORE_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class VQCodec:
  """A VQ model of the modality maps (one, or one per modality) with jitted encode / decode."""

  model: vqgan_lib.VQGAN
  params: Any  # plain VQGAN tree, or stacked over MODALITIES when per_modality
  per_modality: bool
  map_size: int
  meta: dict

  @classmethod
  def from_encoders(cls, conditioner, params, config) -> "VQCodec":
    """The VQ model of ``config.vq`` (``params`` as the frozen encoders load them)."""
    m = int(config.data.map_size)
    arch = conditioner.vq.config
    meta = {"tokenizer_sha256": encoder_fingerprint(config, "vq"), "map_size": m,
            "grid": m // arch.downsample_factor, "codebook_size": arch.num_vq_embeddings,
            "per_modality": bool(config.vq.per_modality), "modalities": list(MODALITIES)}
    return cls(conditioner.vq, params, bool(config.vq.per_modality), m, meta)

  @property
  def grid(self) -> int:
    return self.map_size // self.model.config.downsample_factor

  def _params(self, modality: str):
    if not self.per_modality:
      return self.params
    i = MODALITIES.index(modality)
    return jax.tree.map(lambda p: p[i], self.params)

  def encode(self, modality: str, maps: np.ndarray) -> np.ndarray:
    """Rendered maps ``[N, M, M, 3]`` in [-1, 1] -> int32 ids ``[N, g, g]``."""
    return np.asarray(_encode(self.model, self._params(modality), jnp.asarray(maps)))

  def decode(self, modality: str, ids: np.ndarray) -> np.ndarray:
    """Ids ``[N, g, g]`` -> reconstructed maps ``[N, M, M, 3]`` (float32, about [-1, 1])."""
    return np.asarray(_decode(self.model, self._params(modality), jnp.asarray(ids, jnp.int32)))


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(model: vqgan_lib.VQGAN, params, x):
  return model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode_ids)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(model: vqgan_lib.VQGAN, params, ids):
  return model.apply({"params": params}, ids, method=vqgan_lib.VQGAN.decode_ids)


def load_vq(vq_dir: str) -> VQCodec:
  """Loads the VQ model a ``train_vq`` workdir exported (``config.json`` + ``vq.safetensors``)."""
  if not os.path.isdir(vq_dir):
    raise NotADirectoryError(f"--vq={vq_dir!r}: not a directory (expected a train_vq workdir)")
  config = ckpt_lib.load_config(vq_dir)
  path = os.path.join(vq_dir, EXPORT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--vq={vq_dir!r}: {EXPORT_FILE} not found (it is written "
                            "with the report when python -m mmsr_jax.train_vq finishes)")
  arch = build.vq_arch(config)
  model = vqgan_lib.VQGAN(arch)
  m = int(config.data.map_size)
  init = lambda r: model.init(r, jnp.zeros((1, m, m, 3)))["params"]  # noqa: E731
  per_modality = bool(config.vq.get("per_modality", False))
  if per_modality:
    abstract = jax.eval_shape(lambda: jax.vmap(init)(jax.random.split(jax.random.key(0), 3)))
  else:
    abstract = jax.eval_shape(lambda: init(jax.random.key(0)))
  params = params_io.load_params(path, abstract, field="--vq")
  meta = {"tokenizer_sha256": weights_fingerprint(path), "map_size": m,
          "grid": m // arch.downsample_factor, "codebook_size": arch.num_vq_embeddings,
          "per_modality": per_modality, "modalities": list(MODALITIES)}
  return VQCodec(model, params, per_modality, m, meta)


def record_maps_full(decoded: dict[str, Any], map_size: int) -> dict[str, np.ndarray]:
  """The rendered whole maps a decoded annotator record has (edges from its image if needed)."""
  maps = {k: decoded[k] for k in MODALITIES if decoded.get(k) is not None}
  if "edge" not in maps and decoded.get("image") is not None:
    maps["edge"] = canny(decoded["image"])
  return {k: render_map(k, v, map_size) for k, v in maps.items()}


def record_crop_maps(decoded: dict[str, Any], crop_size: int, crops: int, key: int,
                     map_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The crop bank's boxes (int32 ``[N, 2]``) of one decoded record and its rendered depth / seg
  crops (``{modality: float32 [N, 2 (flip), M, M, 3]}`` for the maps the record has), made
  exactly as the training pipeline makes them; ``key`` is the record's index."""
  rec = sources.on_image_grid(decoded, f"record {key}")
  rec = resize_min_side(rec, crop_size)
  h, w = rec["image"].shape[:2]
  boxes = crop_bank_boxes(h, w, crop_size, crops, key)
  maps: dict[str, np.ndarray] = {}
  for b, (top, left) in enumerate(boxes):
    for flip in (0, 1):
      rendered = render_crop_maps(rec, int(top), int(left), crop_size, bool(flip),
                                           map_size)
      for k, v in rendered.items():
        maps.setdefault(k, np.zeros((crops, 2) + v.shape, np.float32))[b, flip] = v
  return boxes, maps


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
  """An array as a record stores it: bfloat16 as its uint16 bits (``.npy`` has no bfloat16)."""
  if dtype == "bfloat16":
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
  return np.asarray(x, np.float32)


def with_vq_run(config, vq_dir: str) -> ml_collections.ConfigDict:
  """``config`` with the VQ tokenizer of a ``python -m mmsr_jax.train_vq`` run: its exported
  weights, architecture, map size and per-modality setting."""
  vq = ckpt_lib.load_config(vq_dir)
  path = os.path.join(vq_dir, EXPORT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--vq={vq_dir!r}: {EXPORT_FILE} not found (it is written "
                            "with the report when python -m mmsr_jax.train_vq finishes)")
  config = ml_collections.ConfigDict(config.to_dict())
  config.vq.params = path
  config.vq.arch = vq.vq.arch.to_dict()
  config.vq.per_modality = bool(vq.vq.get("per_modality", False))
  config.data.map_size = int(vq.data.map_size)
  return config


class Encoders:
  """The frozen encoders of a config, in float32, as the pass runs them (``parts`` loaded)."""

  def __init__(self, config, parts: tuple[str, ...]):
    c32 = ml_collections.ConfigDict(config.to_dict())
    c32.compute_dtype = "float32"  # features are computed at full precision, stored as asked
    self.config = config
    self.conditioner = build.conditioner(c32)
    self.params = frozen_params(c32, self.conditioner, parts)
    cond = self.conditioner
    self.text = jax.jit(lambda p, ids, mask: cond.text_states({"text": p}, ids, mask))
    self.latent = jax.jit(lambda p, x: cond.encode_image({"ae": p}, x))
    self.vq = VQCodec.from_encoders(cond, self.params.get("vq"), config) if "vq" in parts \
        else None

  def padded(self, fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn(params, x)`` in calls of exactly ``batch_size`` rows (the last padded), so one
    compiled shape serves every call."""
    out = []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(fn(params, chunk))[:batch_size - pad])
    return np.concatenate(out)


def record_crop_images(decoded: dict[str, Any], boxes: np.ndarray, crop_size: int,
                       encoding: str = "png") -> tuple[dict[str, list[bytes]], dict, np.ndarray]:
  """The crop images of a record's bank boxes (``formats.records.add_crops``): per kind the
  encoded crops, their meta, and the image crops as they decode (uint8 ``[N, S, S, 3]``; equal to
  the cut for 'png'), which the HR latents are then computed from."""
  rec = resize_min_side(sources.on_image_grid(decoded, "record"), crop_size)
  crops: dict[str, list[bytes]] = {"image": []}
  for kind in ("depth", "seg"):
    if rec.get(kind) is not None:
      crops[kind] = []
  for top, left in boxes:
    window = (slice(int(top), int(top) + crop_size), slice(int(left), int(left) + crop_size))
    crops["image"].append(encode_crop_image(rec["image"][window], encoding))
    for kind in crops:
      if kind != "image":
        crops[kind].append(encode_crop_map(kind, rec[kind][window]))
  meta = {"encoding": encoding, "quality": 95 if encoding == "jpeg" else None,
          "crop_size": int(crop_size), "boxes": len(boxes),
          "image_hw": list(decoded["image"].shape[:2]), "grid_hw": list(rec["image"].shape[:2])}
  images = np.stack([decode_crop_image(b) for b in crops["image"]])
  return crops, meta, images


def hr_crops_of(images: np.ndarray) -> np.ndarray:
  """uint8 crops ``[N, S, S, 3]`` -> float32 ``[N, 2 (flip), S, S, 3]`` in [-1, 1]."""
  x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return np.stack([x, x[:, :, ::-1]], axis=1)


def record_hr_crops(decoded: dict[str, Any], boxes: np.ndarray, crop_size: int) -> np.ndarray:
  """The HR crops of a record's bank boxes as the trainer sees them, float32 ``[N, 2 (flip),
  S, S, 3]`` in [-1, 1]."""
  rec = resize_min_side(sources.on_image_grid(decoded, "record"), crop_size)
  out = np.zeros((len(boxes), 2, crop_size, crop_size, 3), np.float32)
  for b, (top, left) in enumerate(boxes):
    crop = rec["image"][top:top + crop_size, left:left + crop_size].astype(np.float32)
    crop = crop / np.float32(127.5) - np.float32(1.0)
    out[b, 0], out[b, 1] = crop, crop[:, ::-1]
  return out


def _prepare(config, rec: bytes, key: int, vq, features, bank_on: bool, crop_size: int,
             crops: int, crop_encoding: str, captions) -> dict[str, Any]:
  """The host-side work of one record: decoded maps, crop bank, crop images, caption ids."""
  decoded = decode_record(rec)  # once: the PNG decodes are the main host cost
  item: dict[str, Any] = {"record": rec, "maps": {}, "crop_maps": {}}
  if "vq" in features:
    item["maps"] = record_maps_full(decoded, vq.map_size)
  if bank_on:
    item["boxes"], item["crop_maps"] = record_crop_maps(
        decoded, crop_size, crops, key, int(config.data.map_size))
  if "crops" in features:
    # The latents are those of the crops as stored (the same pixels for 'png').
    item["crops"], item["crops_meta"], images = record_crop_images(
        decoded, item["boxes"], crop_size, crop_encoding)
    if "latents" in features:
      item["hr_crops"] = hr_crops_of(images)
  elif "latents" in features:
    item["hr_crops"] = record_hr_crops(decoded, item["boxes"], crop_size)
  if "text" in features:
    item["text"] = captions.encode(decoded["caption"] or "", int(config.text.max_length))
  return item


def precompute_records(config, encoders: Encoders, records: Iterable[bytes], *,
                       features=FEATURES, batch_size: int = 64, crop_size: int = 0,
                       crops: int = 16, first_index: int = 0,
                       dtype: str = "bfloat16", crop_encoding: str = "png",
                       on_reject=None, seconds: dict[str, float] | None = None
                       ) -> Iterable[bytes]:
  """Yields the records with the ``features`` added (encoders run in batches).

  With ``crop_size > 0`` each record gets its crop bank of ``crops`` boxes; the record at
  position j is keyed ``first_index + j`` for ``crops.crop_bank_boxes``. Feature 'crops'
  stores the boxes' crops encoded as ``crop_encoding``. A record that cannot be decoded or cut
  raises, or with ``on_reject`` is passed over after ``on_reject(j, reason)``. ``seconds``
  accumulates the time per stage ('host', 'vq', 'latents', 'text').
  """
  seconds = {} if seconds is None else seconds

  def clock(name, start):
    now = time.perf_counter()
    seconds[name] = seconds.get(name, 0.0) + now - start
    return now

  vq = encoders.vq
  bank_on = bool(crop_size) and ("vq" in features or "latents" in features
                                 or "crops" in features)
  vq_meta = dict(vq.meta, crop_size=int(crop_size) if bank_on else 0,
                 crops=int(crops) if bank_on else 0) if vq is not None else None
  g = vq.grid if vq is not None else 1
  captions = make_tokenizer(config.text.tokenizer) if "text" in features else None
  fmeta = {}
  if "text" in features:
    fmeta[TEXT_STATES_KEY] = {
        "fingerprint": encoder_fingerprint(config, "text"), "tokenizer": config.text.tokenizer,
        "max_length": int(config.text.max_length),
        "d_model": int(config.text.encoder.d_model), "dtype": dtype}
  if crop_encoding not in CROP_ENCODINGS:
    raise ValueError(f"--crop_encoding={crop_encoding!r}: expected one of {CROP_ENCODINGS}")
  for name in ("latents", "crops"):
    if name in features and not crop_size:
      raise ValueError(f"--features={name} belongs to a crop bank: give --crop_size (the "
                       "config's data.hr_size)")
  if "latents" in features:
    fmeta[HR_LATENTS_KEY] = {
        "fingerprint": encoder_fingerprint(config, "ae"), "crop_size": int(crop_size),
        "scaling_factor": float(config.autoencoder.scaling_factor),
        "shift_factor": float(config.autoencoder.get("shift_factor", 0.0) or 0.0),
        "dtype": dtype}
  pending: list[dict[str, Any]] = []
  per_flush = max(1, batch_size // (2 * crops)) if bank_on else batch_size

  def flush():
    t = time.perf_counter()
    ids_of, banks = _token_ids(encoders, pending, features, bank_on, crops, g, batch_size)
    if "vq" in features:
      t = clock("vq", t)
    feats: list[dict[str, np.ndarray]] = [{} for _ in pending]
    if "latents" in features:
      for f, lat in zip(feats, _hr_latents(encoders, pending, crops, batch_size)):
        f[HR_LATENTS_KEY] = _stored(lat, dtype)
      t = clock("latents", t)
    if "text" in features:
      for f, states in zip(feats, _caption_states(encoders, pending)):
        f[TEXT_STATES_KEY] = _stored(states, dtype)
      clock("text", t)
    out = []
    for i, p in enumerate(pending):
      rec = p["record"]
      if "vq" in features:
        rec = add_ids(rec, ids_of[i], vq_meta, banks[i])
      elif bank_on:
        rec = add_ids(rec, {}, dict(vq_meta or {}, crop_size=int(crop_size), crops=int(crops),
                                    map_size=int(config.data.map_size), grid=g), banks[i])
      if feats[i]:
        meta = {k: dict(fmeta[k], shape=list(v.shape)) for k, v in feats[i].items()}
        rec = add_features(rec, feats[i], meta)
      if "crops" in features:
        rec = add_crops(rec, p["crops"], p["crops_meta"])
      out.append(rec)
    pending.clear()
    return out

  for j, rec in enumerate(records):
    t = time.perf_counter()
    try:
      item = _prepare(config, rec, first_index + j, vq, features, bank_on, crop_size, crops,
                      crop_encoding, captions)
    except Exception as e:  # pylint: disable=broad-except
      if on_reject is None:
        raise
      on_reject(j, f"{type(e).__name__}: {e}")
      continue
    finally:
      clock("host", t)
    pending.append(item)
    if len(pending) >= per_flush:
      yield from flush()
  if pending:
    yield from flush()


def _token_ids(encoders: Encoders, pending: list[dict[str, Any]], features, bank_on: bool,
               crops: int, g: int, batch_size: int):
  """Per prepared record: the token ids of its whole maps (with feature 'vq'), and its crop bank
  (with a bank: the boxes, presence, and with 'vq' the ids of each box's depth / seg crops)."""
  vq = encoders.vq
  ids_of: list[dict[str, np.ndarray]] = [{} for _ in pending]
  banks: list[dict[str, np.ndarray] | None] = [None] * len(pending)
  if "vq" in features:
    for k in MODALITIES:
      rows = [(i, p["maps"][k]) for i, p in enumerate(pending) if k in p["maps"]]
      if rows:
        ids = vq.encode(k, np.stack([m for _, m in rows]))
        for (i, _), row_ids in zip(rows, ids):
          ids_of[i][k] = row_ids
  if bank_on:
    for i, p in enumerate(pending):
      banks[i] = {"boxes": p["boxes"],
                  "ids": np.zeros((crops, 2, len(MODALITIES), g, g), np.int16),
                  "present": np.array([k in p["crop_maps"] for k in MODALITIES], np.bool_)}
  if "vq" in features and bank_on:
    for k in ("depth", "seg"):
      rows = [(i, p["crop_maps"][k]) for i, p in enumerate(pending) if k in p["crop_maps"]]
      if rows:
        flat = np.concatenate([m.reshape((-1,) + m.shape[2:]) for _, m in rows])
        ids = encoders.padded(lambda _, x: vq.encode(k, x), None, flat, batch_size)  # noqa: B023
        for (i, _), row_ids in zip(rows, ids.reshape(len(rows), crops, 2, g, g)):
          banks[i]["ids"][:, :, MODALITIES.index(k)] = row_ids
  return ids_of, banks


def _hr_latents(encoders: Encoders, pending: list[dict[str, Any]], crops: int,
                batch_size: int) -> np.ndarray:
  """The autoencoder latents of every record's bank crops, ``[records, crops, 2 (flip), ...]``."""
  crops_all = np.concatenate([p["hr_crops"].reshape((-1,) + p["hr_crops"].shape[2:])
                              for p in pending])
  lat = encoders.padded(encoders.latent, encoders.params["ae"], crops_all,
                        max(1, batch_size // 8))
  return lat.reshape(len(pending), crops, 2, *lat.shape[1:])


def _caption_states(encoders: Encoders, pending: list[dict[str, Any]]) -> list[np.ndarray]:
  """Each record's caption states, its real tokens only."""
  ids = np.stack([p["text"][0] for p in pending])
  mask = np.stack([p["text"][1] for p in pending])
  states = np.asarray(encoders.text(encoders.params["text"], ids, mask))
  return [states[i, :int(m.sum())] for i, m in enumerate(mask)]


def write_null_text(config, encoders: Encoders, path: str, dtype: str) -> None:
  """The empty caption's states (condition dropout's) beside the shards."""
  ids, mask = make_tokenizer(config.text.tokenizer).encode("", int(config.text.max_length))
  states = np.asarray(encoders.text(encoders.params["text"], ids[None], mask[None]))[0]
  meta = {"fingerprint": encoder_fingerprint(config, "text"), "tokenizer": config.text.tokenizer,
          "max_length": int(config.text.max_length), "d_model": int(states.shape[-1]),
          "dtype": dtype}
  tmp = path + ".tmp.npz"
  np.savez(tmp, states=_stored(states, dtype), mask=np.asarray(mask, np.int32),
           meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8))
  os.replace(tmp, path)


def check_options(config, features, batch_size: int, crop_size: int | None, crops: int,
                  dtype: str, crop_encoding: str) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
  """The checks of the pass's settings; returns the features, the crop size (``None``: the
  config's ``data.hr_size``) and the encoder parts to load."""
  crop_size = int(config.data.hr_size) if crop_size is None else int(crop_size)
  features = tuple(features)
  unknown = [f for f in features if f not in FEATURES]
  if unknown or not features:
    raise ValueError(f"--features={','.join(features)}: expected a non-empty subset of {FEATURES}")
  if dtype not in STORE_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {STORE_DTYPES}")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: expected >= 1")
  if crop_size < 0:
    raise ValueError(f"--crop_size={crop_size}: expected the SR config's data.hr_size, or 0 "
                     "for whole-map ids only")
  if crops < 1:
    raise ValueError(f"--crops={crops}: expected >= 1")
  if crop_encoding not in CROP_ENCODINGS:
    raise ValueError(f"--crop_encoding={crop_encoding!r}: expected one of {CROP_ENCODINGS}")
  if "crops" in features and not crop_size:
    raise ValueError("--features=crops stores the crop bank's crops: give --crop_size > 0")
  parts = tuple(p for p, f in (("vq", "vq"), ("text", "text"), ("ae", "latents"))
                if f in features)
  return features, crop_size, parts


def record_counts(files: list[str]) -> list[int]:
  counts = []
  for f in files:
    reader = ArrayRecordReader(f)
    counts.append(reader.num_records())
    reader.close()
  return counts


def first_indices(counts: list[int]) -> list[int]:
  """Global index of each shard's first record (the crop bank's keys)."""
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()


def read_shard(path: str) -> list[bytes]:
  reader = ArrayRecordReader(path)
  recs = [reader.read([i])[0] for i in range(reader.num_records())]
  reader.close()
  return recs


def write_shard(path: str, recs: Iterable[bytes]) -> int:
  """Writes ``recs`` as the local ArrayRecord file ``path``; returns how many."""
  # Uncompressed: the entries are PNG / JPEG / arrays that barely compress, and reading a
  # compressed record costs the trainer's host several times its memory copy.
  writer = ArrayRecordWriter(path, "group_size:1,uncompressed")
  count = 0
  for rec in recs:
    writer.write(rec)
    count += 1
  writer.close()
  return count


def settings_of(config, features, crop_size: int, crops: int, dtype: str, crop_encoding: str,
                parts) -> dict[str, Any]:
  """What ``precompute.json`` records of a pass: its settings and encoder fingerprints."""
  vq_meta = None
  if "vq" in parts:
    vq_meta = VQCodec.from_encoders(build.conditioner(config), None, config).meta
  return {"features": list(features), "crop_size": crop_size,
          "crops": crops if crop_size else 0, "dtype": dtype,
          "crop_encoding": crop_encoding if "crops" in features else None,
          "fingerprints": {p: encoder_fingerprint(config, p) for p in parts}, "vq": vq_meta}


def precompute_shards(config, input_pattern: str, output_dir: str, *, features=FEATURES,
                      batch_size: int = 64, crop_size: int | None = None, crops: int = 16,
                      dtype: str = "bfloat16", overwrite: bool = False,
                      crop_encoding: str = "png", log=print) -> list[str]:
  """Precomputes ``features`` of the shards of ``input_pattern`` into ``output_dir`` in this
  process, shard after shard; returns the written paths. ``mmsr_jax.data.beam_prepare.precompute``
  runs the same work as an Apache Beam pipeline (what the command runs); this loop is its
  reference.

  ``crop_size`` (default: the config's ``data.hr_size``; 0: whole-map ids only) adds each
  record's crop bank of ``crops`` boxes (records are keyed by their index over the sorted
  shards, the index ``sources.ArrayRecordSource`` gives them)."""
  files = list_shards(input_pattern, "--input")
  features, crop_size, parts = check_options(config, features, batch_size, crop_size, crops,
                                             dtype, crop_encoding)
  firsts = first_indices(record_counts(files))
  in_dir = os.path.dirname(files[0])
  outs = [os.path.join(output_dir, os.path.basename(f)) for f in files]
  for src, dst in zip(files, outs):
    if os.path.abspath(src) == os.path.abspath(dst):
      raise ValueError(f"--output={output_dir!r} is the input folder: choose another folder")
    if os.path.exists(dst) and not overwrite:
      raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  encoders = Encoders(config, parts)  # after the cheap checks, before any work
  os.makedirs(output_dir, exist_ok=True)
  if "text" in features:
    write_null_text(config, encoders, os.path.join(output_dir, NULL_TEXT_FILE), dtype)
  for src, dst, first_index in zip(files, outs, firsts):
    tmp = dst + ".tmp"
    count = write_shard(tmp, precompute_records(
        config, encoders, read_shard(src), features=features, batch_size=batch_size,
        crop_size=crop_size, crops=crops, first_index=first_index, dtype=dtype,
        crop_encoding=crop_encoding))
    os.replace(tmp, dst)
    log(f"{dst}: {count} records precomputed ({', '.join(features)})")
  manifest = os.path.join(in_dir, MANIFEST)
  if os.path.isfile(manifest):
    dst_manifest = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(dst_manifest) or overwrite:
      shutil.copyfile(manifest, dst_manifest)
  summary = dict(settings_of(config, features, crop_size, crops, dtype, crop_encoding, parts),
                 shards=[os.path.basename(o) for o in outs])
  with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return outs
