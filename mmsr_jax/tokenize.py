r"""Adds VQ token ids to annotated shards: ``python -m mmsr_jax.tokenize --vq=DIR --input=SHARDS
--output=DIR [--crop_size=S --crops=N]``.

``--vq`` is a ``python -m mmsr_jax.train_vq`` workdir (its ``config.json`` gives the architecture
and map size, ``vq.safetensors`` the weights). ``--input`` is a folder (every ``*.array_record``
in it) or a glob of ``mmsr_jax.annotate`` shards. Each record is copied unchanged to a shard of
the same name under ``--output``, with these entries added to its ``.npz`` archive (all uint8 byte
arrays, like the annotator's own entries; the arrays are the bytes of ``.npy`` files):

* ``vq_ids_<modality>`` for each modality the record has (depth, seg, edge): int16 ``[g, g]``
  token ids of the *whole* map rendered at ``map_size x map_size``
  (``mmsr_jax.data.modalities.render_map``); :func:`read_ids` decodes them;
* with ``--crop_size=S`` (S > 0), the crop bank the DiT trainer reads with
  ``config.vq.ids_from='shards'``: ``vq_crop_boxes`` int32 ``[N, 2]`` (top, left) of N crops of
  side S (``mmsr_jax.data.pipeline.crop_bank_boxes``: the centre crop and distinct random ones),
  ``vq_crop_ids`` int16 ``[N, 2, 3, g, g]`` (box, flip (none, horizontal), modality (depth, seg,
  edge)) and ``vq_crop_present`` bool ``[3]``; :func:`read_crop_bank` decodes them;
* ``vq_meta``: UTF-8 JSON with the tokenizer's sha256, map size, token grid, codebook size,
  whether there is one tokenizer per modality, and ``crop_size`` / ``crops`` of the bank.

The crop bank holds the ids of exactly the maps the training pipeline renders: each record is
read as the training source reads it (``mmsr_jax.data.sources.on_image_grid``), resized so its
short side is at least S (``pipeline._resize_min_side``) and each box's depth and seg maps are
cropped, flipped and rendered by ``pipeline.render_crop_maps``. S must be the DiT config's
``data.hr_size`` and the tokenizer's map size its ``data.map_size`` (the trainer checks both, and
that ``config.vq.params`` is this tokenizer). Edge ids are not in the bank (slot 0, not present):
the trainer's edge maps are Canny edges of the randomly degraded LR image, different every step,
so the ``Conditioner`` still encodes them. ``--input``'s ``manifest.json`` is copied alongside.

An output shard that exists is an error (``--overwrite`` replaces it); every shard is written to a
temporary name and renamed when complete. ``--num_workers=N --worker_index=i`` splits the shards
between N independent runs (e.g. one per TPU VM host): worker i takes shards i, i+N, ... and
writes exactly what a single run writes for them (its summary is
``tokenize-<i>-of-<N>.json`` instead of ``tokenize.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mmsr_jax.weights import params_io
from mmsr_jax.data.modalities import MODALITIES, render_map
from mmsr_jax.models import vqgan as vqgan_lib

IDS_PREFIX = "vq_ids_"
META_KEY = "vq_meta"
CROP_BOXES_KEY = "vq_crop_boxes"
CROP_IDS_KEY = "vq_crop_ids"
CROP_PRESENT_KEY = "vq_crop_present"
CROP_KEYS = (CROP_BOXES_KEY, CROP_IDS_KEY, CROP_PRESENT_KEY)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A trained VQ tokenizer (one, or one per modality) with jitted encode / decode."""

  model: vqgan_lib.VQGAN
  params: Any  # plain VQGAN tree, or stacked over MODALITIES when per_modality
  per_modality: bool
  map_size: int
  meta: dict

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


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_tokenizer(vq_dir: str) -> Tokenizer:
  """Loads the tokenizer a ``train_vq`` workdir exported (``config.json`` + ``vq.safetensors``)."""
  from mmsr_jax.runtime import checkpoint as ckpt_lib
  from mmsr_jax import train_vq
  if not os.path.isdir(vq_dir):
    raise NotADirectoryError(f"--vq={vq_dir!r}: not a directory (expected a train_vq workdir)")
  config = ckpt_lib.load_config(vq_dir)
  path = os.path.join(vq_dir, train_vq.EXPORT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--vq={vq_dir!r}: {train_vq.EXPORT_FILE} not found (it is written "
                            "with the report when python -m mmsr_jax.train_vq finishes)")
  arch = train_vq.vq_config(config)
  model = vqgan_lib.VQGAN(dataclasses.replace(arch, dtype="float32"))
  m = int(config.data.map_size)
  init = lambda r: model.init(r, jnp.zeros((1, m, m, 3)))["params"]  # noqa: E731
  per_modality = bool(config.vq.get("per_modality", False))
  if per_modality:
    abstract = jax.eval_shape(lambda: jax.vmap(init)(jax.random.split(jax.random.key(0), 3)))
  else:
    abstract = jax.eval_shape(lambda: init(jax.random.key(0)))
  params = params_io.load_params(path, abstract, field="--vq")
  meta = {"tokenizer_sha256": file_sha256(path), "map_size": m,
          "grid": m // arch.downsample_factor, "codebook_size": arch.num_vq_embeddings,
          "per_modality": per_modality, "modalities": list(MODALITIES)}
  return Tokenizer(model, params, per_modality, m, meta)


# --------------------------------------------------------------------------- record entries
def _npy_bytes(array: np.ndarray) -> np.ndarray:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return np.frombuffer(buf.getvalue(), np.uint8)


def add_ids(record: bytes, ids: dict[str, np.ndarray], meta: dict,
            bank: dict[str, np.ndarray] | None = None) -> bytes:
  """Returns ``record`` (an annotator ``.npz`` archive) with the id entries added (and the crop
  bank ``{'boxes', 'ids', 'present'}`` when given); earlier id entries are replaced."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    entries = {k: z[k] for k in z.files
               if not k.startswith(IDS_PREFIX) and k != META_KEY and k not in CROP_KEYS}
  for k, v in ids.items():
    entries[IDS_PREFIX + k] = _npy_bytes(np.asarray(v, np.int16))
  if bank is not None:
    entries[CROP_BOXES_KEY] = _npy_bytes(np.asarray(bank["boxes"], np.int32))
    entries[CROP_IDS_KEY] = _npy_bytes(np.asarray(bank["ids"], np.int16))
    entries[CROP_PRESENT_KEY] = _npy_bytes(np.asarray(bank["present"], np.bool_))
  entries[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **entries)
  return buf.getvalue()


def read_ids(record: bytes, grid: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """Token ids of a tokenized record: int32 ``[3, g, g]`` (0 where absent), the bool presence
  mask ``[3]`` (order depth, seg, edge) and the ``vq_meta`` dict.

  Raises:
    ValueError: the record was not tokenized, or its grid differs from ``grid``.
  """
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if META_KEY not in z.files:
      raise ValueError("record has no token ids: run python -m mmsr_jax.tokenize on its shards")
    meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
    raw = {k[len(IDS_PREFIX):]: np.load(io.BytesIO(z[k].tobytes()), allow_pickle=False)
           for k in z.files if k.startswith(IDS_PREFIX)}
  g = int(meta["grid"])
  if grid is not None and grid != g:
    raise ValueError(f"record token grid {g}x{g} != the model's {grid}x{grid}: tokenize with the "
                     "tokenizer the config uses")
  ids = np.zeros((len(MODALITIES), g, g), np.int32)
  present = np.zeros((len(MODALITIES),), np.bool_)
  for i, k in enumerate(MODALITIES):
    if k in raw:
      ids[i], present[i] = raw[k], True
  return ids, present, meta


def read_crop_bank(record: bytes) -> dict[str, Any] | None:
  """The crop bank of a record tokenized with ``--crop_size``, else None: ``boxes`` int32
  ``[N, 2]``, ``ids`` int16 ``[N, 2, 3, g, g]``, ``present`` bool ``[3]`` and ``meta``."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    if CROP_BOXES_KEY not in z.files:
      return None
    arrays = {k: np.load(io.BytesIO(z[k].tobytes()), allow_pickle=False) for k in CROP_KEYS}
    meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
  return {"boxes": arrays[CROP_BOXES_KEY], "ids": arrays[CROP_IDS_KEY],
          "present": arrays[CROP_PRESENT_KEY], "meta": meta}


def record_maps_full(decoded: dict[str, Any], map_size: int) -> dict[str, np.ndarray]:
  """The rendered whole maps a decoded annotator record has (edges from its image if needed)."""
  from mmsr_jax import annotate
  maps = {k: decoded[k] for k in MODALITIES if decoded.get(k) is not None}
  if "edge" not in maps and decoded.get("image") is not None:
    maps["edge"] = annotate.edge_map(decoded["image"])
  return {k: render_map(k, v, map_size) for k, v in maps.items()}


def record_crop_maps(decoded: dict[str, Any], crop_size: int, crops: int, key: int,
                     map_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The crop bank's boxes (int32 ``[N, 2]``) of one decoded record and its rendered depth / seg
  crops (``{modality: float32 [N, 2 (flip), M, M, 3]}`` for the maps the record has), made
  exactly as the training pipeline makes them; ``key`` is the record's index."""
  from mmsr_jax.data import sources
  from mmsr_jax.data import sr_examples as pipeline
  rec = sources.on_image_grid(decoded, f"record {key}")
  rec = pipeline._resize_min_side(rec, crop_size)  # pylint: disable=protected-access
  h, w = rec["image"].shape[:2]
  boxes = pipeline.crop_bank_boxes(h, w, crop_size, crops, key)
  maps: dict[str, np.ndarray] = {}
  for b, (top, left) in enumerate(boxes):
    for flip in (0, 1):
      rendered = pipeline.render_crop_maps(rec, int(top), int(left), crop_size, bool(flip),
                                           map_size)
      for k, v in rendered.items():
        maps.setdefault(k, np.zeros((crops, 2) + v.shape, np.float32))[b, flip] = v
  return boxes, maps


def _encode_padded(tok: Tokenizer, modality: str, maps: np.ndarray, batch_size: int
                   ) -> np.ndarray:
  """Encodes ``maps [R, M, M, 3]`` in calls of exactly ``batch_size`` maps (the last one padded
  with zeros), so one compiled shape serves every call."""
  out = []
  for i in range(0, len(maps), batch_size):
    chunk = maps[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(tok.encode(modality, chunk)[:batch_size - pad])
  return np.concatenate(out)


def tokenize_records(tok: Tokenizer, records: Iterable[bytes], batch_size: int = 64, *,
                     crop_size: int = 0, crops: int = 16, first_index: int = 0
                     ) -> Iterable[bytes]:
  """Yields the records with their ids added (maps encoded in batches per modality).

  With ``crop_size > 0`` each record also gets its crop bank of ``crops`` boxes; the record at
  position j is keyed ``first_index + j`` for ``pipeline.crop_bank_boxes``.
  """
  from mmsr_jax import annotate
  meta = dict(tok.meta, crop_size=int(crop_size), crops=int(crops) if crop_size else 0)
  g = tok.grid
  # (record, whole maps, bank boxes, bank maps); a flush encodes about batch_size maps per modality
  pending: list[tuple[bytes, dict[str, np.ndarray], Any, dict[str, np.ndarray]]] = []
  per_flush = max(1, batch_size // (2 * crops)) if crop_size else batch_size

  def flush():
    ids_of: list[dict[str, np.ndarray]] = [{} for _ in pending]
    for k in MODALITIES:
      rows = [(i, m[k]) for i, (_, m, _, _) in enumerate(pending) if k in m]
      if rows:
        ids = tok.encode(k, np.stack([m for _, m in rows]))
        for (i, _), row_ids in zip(rows, ids):
          ids_of[i][k] = row_ids
    banks: list[dict[str, np.ndarray] | None] = [None] * len(pending)
    if crop_size:
      for i, (_, _, boxes, cmaps) in enumerate(pending):
        banks[i] = {"boxes": boxes,
                    "ids": np.zeros((crops, 2, len(MODALITIES), g, g), np.int16),
                    "present": np.array([k in cmaps for k in MODALITIES], np.bool_)}
      for k in ("depth", "seg"):
        rows = [(i, cm[k]) for i, (_, _, _, cm) in enumerate(pending) if k in cm]
        if rows:
          flat = np.concatenate([m.reshape((-1,) + m.shape[2:]) for _, m in rows])
          ids = _encode_padded(tok, k, flat, batch_size).reshape(len(rows), crops, 2, g, g)
          for (i, _), row_ids in zip(rows, ids):
            banks[i]["ids"][:, :, MODALITIES.index(k)] = row_ids
    out = [add_ids(rec, ids, meta, bank)
           for (rec, _, _, _), ids, bank in zip(pending, ids_of, banks)]
    pending.clear()
    return out

  for j, rec in enumerate(records):
    decoded = annotate.decode_record(rec)  # once: the PNG decodes are tokenize's main host cost
    boxes, cmaps = (record_crop_maps(decoded, crop_size, crops, first_index + j, tok.map_size)
                    if crop_size else (None, {}))
    pending.append((rec, record_maps_full(decoded, tok.map_size), boxes, cmaps))
    if len(pending) >= per_flush:
      yield from flush()
  if pending:
    yield from flush()


def tokenize_shards(vq_dir: str, input_pattern: str, output_dir: str, *, batch_size: int = 64,
                    crop_size: int = 0, crops: int = 16, overwrite: bool = False,
                    worker_index: int = 0, num_workers: int = 1, log=print) -> list[str]:
  """Tokenizes the shards of ``input_pattern`` into ``output_dir``; returns the written paths.

  ``crop_size > 0`` adds each record's crop bank of ``crops`` boxes (records are keyed by their
  index over the sorted shards, the index ``sources.ArrayRecordSource`` gives them).
  ``num_workers > 1`` splits the work between that many independent runs (hosts of a TPU VM, or
  processes): worker ``worker_index`` takes shards ``worker_index, worker_index + num_workers,
  ...`` and writes exactly the records a single run would (the record keys are global)."""
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  from mmsr_jax.train_vq import shard_files
  files = shard_files(input_pattern, "--input")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: expected >= 1")
  if crop_size < 0:
    raise ValueError(f"--crop_size={crop_size}: expected the DiT config's data.hr_size, or 0 "
                     "for whole-map ids only")
  if crops < 1:
    raise ValueError(f"--crops={crops}: expected >= 1")
  if num_workers < 1 or not 0 <= worker_index < num_workers:
    raise ValueError(f"--worker_index={worker_index} --num_workers={num_workers}: expected "
                     "num_workers >= 1 and 0 <= worker_index < num_workers")
  # Global index of each shard's first record (the crop bank's keys), then this worker's share.
  counts = []
  for f in files:
    reader = ArrayRecordReader(f)
    counts.append(reader.num_records())
    reader.close()
  firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
  mine = list(range(worker_index, len(files), num_workers))
  files, firsts = [files[i] for i in mine], [firsts[i] for i in mine]
  outs = [os.path.join(output_dir, os.path.basename(f)) for f in files]
  for src, dst in zip(files, outs):
    if os.path.abspath(src) == os.path.abspath(dst):
      raise ValueError(f"--output={output_dir!r} is the input folder: choose another folder")
    if os.path.exists(dst) and not overwrite:
      raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  tok = load_tokenizer(vq_dir)  # after the cheap checks, before any work
  os.makedirs(output_dir, exist_ok=True)
  for src, dst, first_index in zip(files, outs, firsts):
    reader = ArrayRecordReader(src)
    n = reader.num_records()
    records = (reader.read([i])[0] for i in range(n))
    tmp = dst + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    for rec in tokenize_records(tok, records, batch_size, crop_size=crop_size, crops=crops,
                                first_index=first_index):
      writer.write(rec)
      count += 1
    writer.close()
    reader.close()
    os.replace(tmp, dst)
    log(f"{dst}: {count} records tokenized")
  manifest = os.path.join(os.path.dirname(shard_files(input_pattern, "--input")[0]),
                          "manifest.json")
  if worker_index == 0 and os.path.isfile(manifest):
    dst_manifest = os.path.join(output_dir, "manifest.json")
    if not os.path.exists(dst_manifest) or overwrite:
      shutil.copyfile(manifest, dst_manifest)
  summary = ("tokenize.json" if num_workers == 1
             else f"tokenize-{worker_index:05d}-of-{num_workers:05d}.json")
  with open(os.path.join(output_dir, summary), "w") as f:
    json.dump(dict(tok.meta, vq=os.path.abspath(vq_dir), crop_size=crop_size,
                   crops=crops if crop_size else 0, shards=[os.path.basename(o) for o in outs]),
              f, indent=2)
  return outs


# --------------------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("vq", "input", "output"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  tokenize_shards(f.vq, f.input, f.output, batch_size=f.batch_size, crop_size=f.crop_size,
                  crops=f.crops, overwrite=f.overwrite, worker_index=f.worker_index,
                  num_workers=f.num_workers)


def define_flags() -> None:
  flags.DEFINE_string("vq", None, "A python -m mmsr_jax.train_vq workdir.")
  flags.DEFINE_string("input", None, "Folder or glob of mmsr_jax.annotate ArrayRecord shards.")
  flags.DEFINE_string("output", None, "Folder for the tokenized shards (same names).")
  flags.DEFINE_integer("batch_size", 64, "Maps encoded per call.")
  flags.DEFINE_integer("crop_size", 0, "Side of the crop bank's crops: the DiT config's "
                       "data.hr_size (for config.vq.ids_from='shards'); 0 = whole-map ids only.")
  flags.DEFINE_integer("crops", 16, "Crop boxes per record in the crop bank.")
  flags.DEFINE_bool("overwrite", False, "Replace output shards that exist.")
  flags.DEFINE_integer("worker_index", 0, "This run's share of the shards (with --num_workers).")
  flags.DEFINE_integer("num_workers", 1, "Independent runs splitting the shards (e.g. one per "
                       "TPU VM host, --worker_index=$HOST): worker i takes shards i, i+n, ...")


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
