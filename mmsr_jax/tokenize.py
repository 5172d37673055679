r"""Adds VQ token ids to annotated shards: ``python -m mmsr_jax.tokenize --vq=DIR --input=SHARDS
--output=DIR``.

``--vq`` is a ``python -m mmsr_jax.train_vq`` workdir (its ``config.json`` gives the architecture
and map size, ``vq.safetensors`` the weights). ``--input`` is a folder (every ``*.array_record``
in it) or a glob of ``mmsr_jax.annotate`` shards. Each record is copied unchanged to a shard of
the same name under ``--output``, with these entries added to its ``.npz`` archive (all uint8 byte
arrays, like the annotator's own entries):

* ``vq_ids_<modality>`` for each modality the record has (depth, seg, edge): the bytes of an
  ``.npy`` file holding int16 ``[h, w]`` token ids (:func:`read_ids` decodes them);
* ``vq_meta``: UTF-8 JSON with the tokenizer's sha256, map size, token grid, codebook size and
  whether there is one tokenizer per modality.

The ids are those of each *whole* map rendered at ``map_size x map_size``
(``mmsr_jax.data.modalities.render_map``, as the DiT trainer renders them), so they are valid for
a training pipeline that feeds whole images (resized), not random crops; such a pipeline sets
``config.vq.ids_from='shards'`` and puts them in the batch as ``vq_ids`` (int32 ``[3, h, w]``,
order depth, seg, edge; :func:`read_ids` returns them with the presence mask), and the
``Conditioner`` then skips the VQ encoder. ``--input``'s ``manifest.json`` is copied alongside.

An output shard that exists is an error (``--overwrite`` replaces it); every shard is written to a
temporary name and renamed when complete.
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

from mmsr_jax import params_io
from mmsr_jax.data.modalities import MODALITIES, render_map
from mmsr_jax.models import vqgan as vqgan_lib

IDS_PREFIX = "vq_ids_"
META_KEY = "vq_meta"


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


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_tokenizer(vq_dir: str) -> Tokenizer:
  """Loads the tokenizer a ``train_vq`` workdir exported (``config.json`` + ``vq.safetensors``)."""
  from mmsr_jax import checkpoint as ckpt_lib
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
  meta = {"tokenizer_sha256": _sha256(path), "map_size": m,
          "grid": m // arch.downsample_factor, "codebook_size": arch.num_vq_embeddings,
          "per_modality": per_modality, "modalities": list(MODALITIES)}
  return Tokenizer(model, params, per_modality, m, meta)


# --------------------------------------------------------------------------- record entries
def _npy_bytes(array: np.ndarray) -> np.ndarray:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return np.frombuffer(buf.getvalue(), np.uint8)


def add_ids(record: bytes, ids: dict[str, np.ndarray], meta: dict) -> bytes:
  """Returns ``record`` (an annotator ``.npz`` archive) with the id entries added."""
  with np.load(io.BytesIO(record), allow_pickle=False) as z:
    entries = {k: z[k] for k in z.files if not k.startswith(IDS_PREFIX) and k != META_KEY}
  for k, v in ids.items():
    entries[IDS_PREFIX + k] = _npy_bytes(np.asarray(v, np.int16))
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


def record_maps_full(decoded: dict[str, Any], map_size: int) -> dict[str, np.ndarray]:
  """The rendered whole maps a decoded annotator record has (edges from its image if needed)."""
  from mmsr_jax import annotate
  maps = {k: decoded[k] for k in MODALITIES if decoded.get(k) is not None}
  if "edge" not in maps and decoded.get("image") is not None:
    maps["edge"] = annotate.edge_map(decoded["image"])
  return {k: render_map(k, v, map_size) for k, v in maps.items()}


def tokenize_records(tok: Tokenizer, records: Iterable[bytes], batch_size: int = 64
                     ) -> Iterable[bytes]:
  """Yields the records with their ids added (maps encoded in batches per modality)."""
  from mmsr_jax import annotate
  pending: list[tuple[bytes, dict[str, np.ndarray]]] = []

  def flush():
    ids_of: list[dict[str, np.ndarray]] = [{} for _ in pending]
    for k in MODALITIES:
      rows = [(i, m[k]) for i, (_, m) in enumerate(pending) if k in m]
      if rows:
        ids = tok.encode(k, np.stack([m for _, m in rows]))
        for (i, _), row_ids in zip(rows, ids):
          ids_of[i][k] = row_ids
    out = [add_ids(rec, ids, tok.meta) for (rec, _), ids in zip(pending, ids_of)]
    pending.clear()
    return out

  for rec in records:
    pending.append((rec, record_maps_full(annotate.decode_record(rec), tok.map_size)))
    if len(pending) >= batch_size:
      yield from flush()
  if pending:
    yield from flush()


def tokenize_shards(vq_dir: str, input_pattern: str, output_dir: str, *, batch_size: int = 64,
                    overwrite: bool = False, log=print) -> list[str]:
  """Tokenizes every shard of ``input_pattern`` into ``output_dir``; returns the written paths."""
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  from mmsr_jax.train_vq import shard_files
  files = shard_files(input_pattern, "--input")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: expected >= 1")
  outs = [os.path.join(output_dir, os.path.basename(f)) for f in files]
  for src, dst in zip(files, outs):
    if os.path.abspath(src) == os.path.abspath(dst):
      raise ValueError(f"--output={output_dir!r} is the input folder: choose another folder")
    if os.path.exists(dst) and not overwrite:
      raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  tok = load_tokenizer(vq_dir)  # after the cheap checks, before any work
  os.makedirs(output_dir, exist_ok=True)
  for src, dst in zip(files, outs):
    reader = ArrayRecordReader(src)
    n = reader.num_records()
    records = (reader.read([i])[0] for i in range(n))
    tmp = dst + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    for rec in tokenize_records(tok, records, batch_size):
      writer.write(rec)
      count += 1
    writer.close()
    reader.close()
    os.replace(tmp, dst)
    log(f"{dst}: {count} records tokenized")
  manifest = os.path.join(os.path.dirname(files[0]), "manifest.json")
  if os.path.isfile(manifest):
    dst_manifest = os.path.join(output_dir, "manifest.json")
    if not os.path.exists(dst_manifest) or overwrite:
      shutil.copyfile(manifest, dst_manifest)
  with open(os.path.join(output_dir, "tokenize.json"), "w") as f:
    json.dump(dict(tok.meta, vq=os.path.abspath(vq_dir), shards=[os.path.basename(o) for o in outs]),
              f, indent=2)
  return outs


# --------------------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("vq", "input", "output"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  tokenize_shards(f.vq, f.input, f.output, batch_size=f.batch_size, overwrite=f.overwrite)


def define_flags() -> None:
  flags.DEFINE_string("vq", None, "A python -m mmsr_jax.train_vq workdir.")
  flags.DEFINE_string("input", None, "Folder or glob of mmsr_jax.annotate ArrayRecord shards.")
  flags.DEFINE_string("output", None, "Folder for the tokenized shards (same names).")
  flags.DEFINE_integer("batch_size", 64, "Maps encoded per call.")
  flags.DEFINE_bool("overwrite", False, "Replace output shards that exist.")


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
