"""The on-disk record format shared by the offline passes and the input pipelines.

One ArrayRecord record per image, an ``.npz`` archive of uint8 byte arrays (read with
``allow_pickle=False``). ``annotate`` writes the image and its maps, ``precompute`` adds token ids,
crop banks and encoder features; the training sources read them back. This module depends on
nothing else in the package.

Crop images (``python -m mmsr_jax.precompute``, feature ``crops``): for each box of the record's
crop bank, the HR crop the trainer would cut from the full image (after ``resize_min_side``, not
mirrored), re-encoded on its own, plus the depth / seg crops on the same grid, so a training
example decodes one crop-size image instead of the whole photo. Entries, per box b of the bank
(same order) and per kind in ``CROP_IMAGE_KINDS`` that the record has: ``crops_<kind>_<b:03d>``
uint8, one encoded image (an entry of its own, so reading one box reads only its bytes);
``crops_meta`` JSON: ``version``, ``encoding`` of the images
('png': lossless 8-bit RGB; 'jpeg': baseline JPEG at ``quality``), ``crop_size``, ``boxes`` (N,
the bank's count, same order), ``image_hw`` (the decoded image's size) and ``grid_hw`` (its size
after ``resize_min_side``, the frame of the boxes), ``maps`` (the map kinds stored). Depth crops
are 16-bit PNG of round(depth * 65535) (depth as the record holds it, on the image grid), seg
crops 16-bit PNG of label + 1; both lossless up to that quantisation of the resized depth.
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
# Crop images of the crop bank's boxes (see the module docstring).
CROPS_META_KEY = "crops_meta"
CROP_IMAGE_KINDS = ("image", "depth", "seg")
CROP_ENCODINGS = ("png", "jpeg")
CROPS_VERSION = 1


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


def decode_record(data: bytes, pixels: bool = True) -> dict[str, Any]:
  """Inverse of :func:`encode_record`: ``image`` uint8 HxWx3, ``edge``/``depth`` float32 in
  [0, 1], ``seg`` int32 labels (-1 = no label), ``caption`` str, ``meta`` dict; absent maps are
  None. ``pixels=False`` decodes only the caption and meta (image and maps None)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    if not pixels:
      caption = z["caption"].tobytes().decode("utf-8") if "caption" in z.files else None
      return {"image": None, "edge": None, "depth": None, "seg": None, "caption": caption,
              "meta": json.loads(z["meta"].tobytes().decode("utf-8"))}
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


# ----------------------------------------------------------------------------- crop images
def encode_crop_image(image: np.ndarray, encoding: str, quality: int = 95) -> bytes:
  """One uint8 SxSx3 RGB crop as ``crops_image`` stores it ('png' lossless or 'jpeg')."""
  bgr = np.ascontiguousarray(np.asarray(image, np.uint8)[..., ::-1])
  if encoding == "png":
    return _png(bgr)
  if encoding == "jpeg":
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
      raise RuntimeError(f"JPEG encoding failed for an array of shape {image.shape}")
    return buf.tobytes()
  raise ValueError(f"crop encoding {encoding!r}: expected one of {CROP_ENCODINGS}")


def encode_crop_map(kind: str, crop: np.ndarray) -> bytes:
  """A depth (float in [0, 1]) or seg (int labels >= -1) crop as ``crops_<kind>`` stores it."""
  if kind == "depth":
    return _unit_to_png16(np.asarray(crop, np.float32))
  if kind == "seg":
    return _png((np.asarray(crop, np.int64) + 1).astype(np.uint16))
  raise ValueError(f"crop map kind {kind!r}: expected 'depth' or 'seg'")


def add_crops(record: bytes, crops: dict[str, list[bytes]], meta: dict) -> bytes:
  """``record`` with its crop images (``{kind: [encoded box 0, box 1, ...]}``, kinds from
  ``CROP_IMAGE_KINDS``, 'image' required) and their ``meta``; earlier crop entries replaced."""
  if "image" not in crops:
    raise ValueError("crop images: the 'image' crops are required")
  entries = {}
  for kind, items in crops.items():
    if kind not in CROP_IMAGE_KINDS:
      raise ValueError(f"crop kind {kind!r}: expected one of {CROP_IMAGE_KINDS}")
    for b, item in enumerate(items):
      entries[f"crops_{kind}_{b:03d}"] = np.frombuffer(item, np.uint8)
  maps = sorted(k for k in crops if k != "image")
  entries[CROPS_META_KEY] = _json_entry(dict(meta, version=CROPS_VERSION, maps=maps))
  return _with_entries(record, entries, lambda k: k.startswith("crops_"))


def read_crops(record: bytes) -> dict[str, Any] | None:
  """A record's crop ``meta`` and the ``record`` itself, or None when it has no crop images;
  :func:`decode_crop` reads and decodes one box."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if CROPS_META_KEY not in z.files:
      return None
    meta = json.loads(z[CROPS_META_KEY].tobytes().decode("utf-8"))
  out = {"meta": meta, "record": record}
  if meta.get("version") != CROPS_VERSION or meta.get("encoding") not in CROP_ENCODINGS:
    raise ValueError(f"crop images of version {meta.get('version')} / encoding "
                     f"{meta.get('encoding')!r}: expected version {CROPS_VERSION} and one of "
                     f"{CROP_ENCODINGS}; precompute these shards again")
  return out


def decode_crop(crops: dict[str, Any], box: int) -> dict[str, Any]:
  """Box ``box`` of :func:`read_crops`: ``image`` uint8 SxSx3 RGB, ``depth`` float32 in [0, 1]
  and ``seg`` int32 labels (-1 = none) SxS, or None where the record has no such map."""
  maps = crops["meta"]["maps"]
  with np.load(io.BytesIO(crops["record"]), allow_pickle=False) as z:
    def one(kind, flag):
      out = cv2.imdecode(z[f"crops_{kind}_{int(box):03d}"], flag)
      if out is None:
        raise ValueError(f"undecodable {kind} crop {box} in a record's crop images")
      return out

    out: dict[str, Any] = {"image": one("image", cv2.IMREAD_COLOR)[..., ::-1], "depth": None,
                           "seg": None}
    if "depth" in maps:
      out["depth"] = one("depth", cv2.IMREAD_UNCHANGED).astype(np.float32) / np.float32(65535.0)
    if "seg" in maps:
      out["seg"] = one("seg", cv2.IMREAD_UNCHANGED).astype(np.int32) - 1
  return out


def decode_crop_image(data: bytes) -> np.ndarray:
  """One encoded ``crops_image_*`` entry -> uint8 SxSx3 RGB."""
  out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if out is None:
    raise ValueError("undecodable crop image")
  return out[..., ::-1]
