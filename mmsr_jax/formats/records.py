"""The on-disk record format shared by the offline passes and the input pipelines.

One ArrayRecord record per image, an ``.npz`` archive of uint8 byte arrays (read with
``allow_pickle=False``). ``annotate`` writes the image and its maps, ``precompute`` adds token ids,
crop banks and encoder features; the training sources read them back. This module depends on
nothing else in the package.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from typing import Any

import cv2
import numpy as np

# The spatial modalities and context groups, in this order everywhere (ids, masks, temperatures).
MODALITIES = ("depth", "seg", "edge")
CONTEXT_GROUPS = ("text",) + MODALITIES

RECORD_VERSION = 1
SHARD_SUFFIX = ".array_record"
SHARD_PATTERN = "annotations-{:05d}-of-{:05d}" + SHARD_SUFFIX
MANIFEST = "manifest.json"

# Entries added by ``python -m mmsr_jax.precompute`` (bytes of ``.npy`` files).
IDS_PREFIX = "vq_ids_"
META_KEY = "vq_meta"
CROP_BOXES_KEY = "vq_crop_boxes"
CROP_IDS_KEY = "vq_crop_ids"
CROP_PRESENT_KEY = "vq_crop_present"
CROP_KEYS = (CROP_BOXES_KEY, CROP_IDS_KEY, CROP_PRESENT_KEY)
# Encoder features for training without the frozen encoders in the step: the caption's T5 states
# (its real tokens only) and the VAE latents of the crop bank's boxes, unflipped and mirrored.
TEXT_STATES_KEY = "text_states"  # [tokens, d_model]
HR_LATENTS_KEY = "hr_latents"  # [boxes, 2 (flip), h, w, c]
FEATURES_META_KEY = "features_meta"  # JSON: per feature its encoder fingerprint, dtype, sizes
FEATURE_KEYS = (TEXT_STATES_KEY, HR_LATENTS_KEY, FEATURES_META_KEY)
# Beside the shards: the text states of the empty caption (condition dropout needs them).
NULL_TEXT_FILE = "null_text.npz"


def list_shards(pattern: str, field: str) -> list[str]:
  """The ``.array_record`` shards named by a folder (every shard in it) or a glob, sorted."""
  if not pattern:
    raise ValueError(f"{field} is empty: give a folder or glob of ArrayRecord shards")
  if os.path.isdir(pattern):
    files = glob.glob(os.path.join(pattern, "*" + SHARD_SUFFIX))
  else:
    files = glob.glob(pattern)
  if not files:
    raise FileNotFoundError(f"{field}={pattern!r}: no {SHARD_SUFFIX} shards found")
  return sorted(files)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


# ------------------------------------------------------------------------- image and maps
def _png(array: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".png", array)
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an array of shape {array.shape}")
  return buf.tobytes()


def _unit_to_png16(x: np.ndarray) -> bytes:
  return _png(np.round(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16))


def _archive(entries: dict[str, bytes | np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.frombuffer(v, np.uint8) if isinstance(v, bytes) else v
                   for k, v in entries.items()})
  return buf.getvalue()


def encode_record(image: np.ndarray, maps: dict[str, Any], meta: dict[str, Any]) -> bytes:
  """One annotated image: ``image`` uint8 HxWx3 RGB (stored as PNG); ``maps`` may hold ``edge`` /
  ``depth`` (float HxW in [0, 1], 16-bit PNG), ``seg`` (int labels >= 0, 16-bit PNG of label + 1)
  and ``caption`` (str); ``meta`` is stored as JSON with the format version."""
  entries = {"image": _png(np.ascontiguousarray(image[..., ::-1]))}  # cv2 wants BGR
  for k in ("edge", "depth"):
    if maps.get(k) is not None:
      entries[k] = _unit_to_png16(np.asarray(maps[k], np.float32))
  if maps.get("seg") is not None:
    labels = np.asarray(maps["seg"], np.int64) + 1
    if labels.max() > 65535:
      raise ValueError(f"segmentation label {labels.max() - 1} does not fit 16 bits")
    entries["seg"] = _png(labels.astype(np.uint16))
  if maps.get("caption") is not None:
    entries["caption"] = maps["caption"].encode("utf-8")
  entries["meta"] = json.dumps(dict(meta, version=RECORD_VERSION), sort_keys=True).encode()
  return _archive(entries)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of :func:`encode_record`: ``image`` uint8 HxWx3, ``edge``/``depth`` float32 in
  [0, 1], ``seg`` int32 labels (-1 = no label), ``caption`` str, ``meta`` dict; absent maps are
  None."""
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    raw = {k: z[k].tobytes() for k in z.files}

  def img(b, flag=cv2.IMREAD_UNCHANGED):
    out = cv2.imdecode(np.frombuffer(b, np.uint8), flag)
    if out is None:
      raise ValueError("undecodable PNG entry in an annotation record")
    return out

  out: dict[str, Any] = {"image": img(raw["image"], cv2.IMREAD_COLOR)[..., ::-1].copy()}
  for k in ("edge", "depth"):
    out[k] = img(raw[k]).astype(np.float32) / 65535.0 if k in raw else None
  out["seg"] = img(raw["seg"]).astype(np.int32) - 1 if "seg" in raw else None
  out["caption"] = raw["caption"].decode("utf-8") if "caption" in raw else None
  out["meta"] = json.loads(raw["meta"].decode("utf-8"))
  return out


# ---------------------------------------------------------------------- precomputed entries
def _npy_bytes(array: np.ndarray) -> np.ndarray:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return np.frombuffer(buf.getvalue(), np.uint8)


def _npy(entry: np.ndarray) -> np.ndarray:
  return np.load(io.BytesIO(entry.tobytes()), allow_pickle=False)


def _with_entries(record: bytes, entries: dict[str, np.ndarray], replace) -> bytes:
  """``record`` with ``entries`` added; its earlier entries for which ``replace(name)`` holds
  are dropped first."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    kept = {k: z[k] for k in z.files if not replace(k)}
  return _archive({**kept, **entries})


def _json_entry(value: dict) -> np.ndarray:
  return np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)


def add_ids(record: bytes, ids: dict[str, np.ndarray], meta: dict,
            bank: dict[str, np.ndarray] | None = None) -> bytes:
  """``record`` with token-id entries: whole-map ids ``{modality: int [g, g]}``, the ``meta``
  dict and, when given, the crop bank ``{'boxes', 'ids', 'present'}``; earlier ones replaced."""
  entries = {IDS_PREFIX + k: _npy_bytes(np.asarray(v, np.int16)) for k, v in ids.items()}
  if bank is not None:
    entries[CROP_BOXES_KEY] = _npy_bytes(np.asarray(bank["boxes"], np.int32))
    entries[CROP_IDS_KEY] = _npy_bytes(np.asarray(bank["ids"], np.int16))
    entries[CROP_PRESENT_KEY] = _npy_bytes(np.asarray(bank["present"], np.bool_))
  entries[META_KEY] = _json_entry(meta)
  return _with_entries(record, entries, lambda k: k.startswith(IDS_PREFIX) or k in (
      META_KEY, *CROP_KEYS))


def add_features(record: bytes, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
  """``record`` with encoder features (``TEXT_STATES_KEY``, ``HR_LATENTS_KEY``; numeric arrays,
  bfloat16 stored as its uint16 bits) and their ``meta`` (JSON); earlier features replaced.
  ``HR_LATENTS_KEY`` belongs to the crop bank's boxes, so a record with it has a bank."""
  entries = {k: _npy_bytes(np.asarray(v)) for k, v in arrays.items()}
  entries[FEATURES_META_KEY] = _json_entry(meta)
  return _with_entries(record, entries, lambda k: k in FEATURE_KEYS)


def read_features(record: bytes) -> tuple[dict[str, np.ndarray], dict]:
  """The encoder features a record holds and their meta (empty dicts when it has none)."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if FEATURES_META_KEY not in z.files:
      return {}, {}
    meta = json.loads(z[FEATURES_META_KEY].tobytes().decode("utf-8"))
    arrays = {k: _npy(z[k]) for k in (TEXT_STATES_KEY, HR_LATENTS_KEY) if k in z.files}
  return arrays, meta


def read_ids(record: bytes, grid: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """Whole-map token ids: int32 ``[3, g, g]`` (0 where absent), the presence mask ``[3]`` and
  the meta dict; ValueError when the record has none or their grid is not ``grid``."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if META_KEY not in z.files:
      raise ValueError("record has no token ids: run python -m mmsr_jax.precompute on its shards")
    meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
    raw = {k[len(IDS_PREFIX):]: _npy(z[k]) for k in z.files if k.startswith(IDS_PREFIX)}
  g = int(meta["grid"])
  if grid is not None and grid != g:
    raise ValueError(f"record token grid {g}x{g} != the model's {grid}x{grid}: precompute with "
                     "the tokenizer the config uses")
  ids = np.zeros((len(MODALITIES), g, g), np.int32)
  present = np.zeros((len(MODALITIES),), np.bool_)
  for i, k in enumerate(MODALITIES):
    if k in raw:
      ids[i], present[i] = raw[k], True
  return ids, present, meta


def read_crop_bank(record: bytes) -> dict[str, Any] | None:
  """A record's crop bank, or None: ``boxes`` int32 ``[N, 2]`` (top, left), ``ids`` int16
  ``[N, 2 (flip), 3, g, g]``, ``present`` bool ``[3]`` and ``meta``."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if CROP_BOXES_KEY not in z.files:
      return None
    arrays = {k: _npy(z[k]) for k in CROP_KEYS}
    meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
  return {"boxes": arrays[CROP_BOXES_KEY], "ids": arrays[CROP_IDS_KEY],
          "present": arrays[CROP_PRESENT_KEY], "meta": meta}
