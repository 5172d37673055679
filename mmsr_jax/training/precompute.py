"""The offline encoder pass over annotated shards (``python -m mmsr_jax.precompute``): adds to
each record the VQ token ids of its whole maps and, with a crop size, the crop bank the SR trainer
reads with ``config.vq.ids_from='shards'``: N boxes and the depth / seg ids of each, unflipped and
mirrored, made by the same functions as the training pipeline. Shards are written to a temporary
name and renamed when complete; several independent workers may split the shards."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from mmsr_jax.data import sources, sr_examples
from mmsr_jax.data.modalities import MODALITIES, canny, render_crop_maps, render_map
from mmsr_jax.formats.records import MANIFEST, add_ids, decode_record, file_sha256, list_shards
from mmsr_jax.models import build
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.training.vq_report import EXPORT_FILE
from mmsr_jax.weights import params_io


@dataclasses.dataclass(frozen=True)
class VQTokenizer:
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


def load_tokenizer(vq_dir: str) -> VQTokenizer:
  """Loads the tokenizer a ``train_vq`` workdir exported (``config.json`` + ``vq.safetensors``)."""
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
  meta = {"tokenizer_sha256": file_sha256(path), "map_size": m,
          "grid": m // arch.downsample_factor, "codebook_size": arch.num_vq_embeddings,
          "per_modality": per_modality, "modalities": list(MODALITIES)}
  return VQTokenizer(model, params, per_modality, m, meta)


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
  rec = sr_examples.resize_min_side(rec, crop_size)
  h, w = rec["image"].shape[:2]
  boxes = sr_examples.crop_bank_boxes(h, w, crop_size, crops, key)
  maps: dict[str, np.ndarray] = {}
  for b, (top, left) in enumerate(boxes):
    for flip in (0, 1):
      rendered = render_crop_maps(rec, int(top), int(left), crop_size, bool(flip),
                                           map_size)
      for k, v in rendered.items():
        maps.setdefault(k, np.zeros((crops, 2) + v.shape, np.float32))[b, flip] = v
  return boxes, maps


def _encode_padded(tok: VQTokenizer, modality: str, maps: np.ndarray, batch_size: int
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


def precompute_records(tok: VQTokenizer, records: Iterable[bytes], batch_size: int = 64, *,
                     crop_size: int = 0, crops: int = 16, first_index: int = 0
                     ) -> Iterable[bytes]:
  """Yields the records with their ids added (maps encoded in batches per modality).

  With ``crop_size > 0`` each record also gets its crop bank of ``crops`` boxes; the record at
  position j is keyed ``first_index + j`` for ``sr_examples.crop_bank_boxes``.
  """
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
    decoded = decode_record(rec)  # once: the PNG decodes are the main host cost
    boxes, cmaps = (record_crop_maps(decoded, crop_size, crops, first_index + j, tok.map_size)
                    if crop_size else (None, {}))
    pending.append((rec, record_maps_full(decoded, tok.map_size), boxes, cmaps))
    if len(pending) >= per_flush:
      yield from flush()
  if pending:
    yield from flush()


def precompute_shards(vq_dir: str, input_pattern: str, output_dir: str, *, batch_size: int = 64,
                    crop_size: int = 0, crops: int = 16, overwrite: bool = False,
                    worker_index: int = 0, num_workers: int = 1, log=print) -> list[str]:
  """Tokenizes the shards of ``input_pattern`` into ``output_dir``; returns the written paths.

  ``crop_size > 0`` adds each record's crop bank of ``crops`` boxes (records are keyed by their
  index over the sorted shards, the index ``sources.ArrayRecordSource`` gives them).
  ``num_workers > 1`` splits the work between that many independent runs (hosts of a TPU VM, or
  processes): worker ``worker_index`` takes shards ``worker_index, worker_index + num_workers,
  ...`` and writes exactly the records a single run would (the record keys are global)."""
  files = list_shards(input_pattern, "--input")
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
    for rec in precompute_records(tok, records, batch_size, crop_size=crop_size, crops=crops,
                                first_index=first_index):
      writer.write(rec)
      count += 1
    writer.close()
    reader.close()
    os.replace(tmp, dst)
    log(f"{dst}: {count} records tokenized")
  manifest = os.path.join(os.path.dirname(list_shards(input_pattern, "--input")[0]),
                          MANIFEST)
  if worker_index == 0 and os.path.isfile(manifest):
    dst_manifest = os.path.join(output_dir, "manifest.json")
    if not os.path.exists(dst_manifest) or overwrite:
      shutil.copyfile(manifest, dst_manifest)
  summary = ("precompute.json" if num_workers == 1
             else f"precompute-{worker_index:05d}-of-{num_workers:05d}.json")
  with open(os.path.join(output_dir, summary), "w") as f:
    json.dump(dict(tok.meta, vq=os.path.abspath(vq_dir), crop_size=crop_size,
                   crops=crops if crop_size else 0, shards=[os.path.basename(o) for o in outs]),
              f, indent=2)
  return outs
