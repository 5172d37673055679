r"""Trains the VQGAN modality tokenizers: ``python -m mmsr_jax.train_vq --config=configs/vq_f16.py
--workdir=DIR``.

MMSR turns depth, segmentation and edge maps into discrete VQGAN tokens. This is the trainer of
those tokenizers. It is a second *task* of the project's one training loop (``mmsr_jax.loop``):
the same mesh, sharded jitted update with donated state, Orbax checkpoints with the Grain iterator
position, resume-by-default and non-finite checks as ``mmsr_jax.train``; only the pieces below
are specific to the tokenizer.

* **Data**: 3-channel renderings (``mmsr_jax.data.modalities.render_map``) of depth, segmentation
  and edge maps, from the annotator's ArrayRecord shards (``vq_train.source='shards'``) or the demo
  photos (``'demo'``: Canny edges of random crops, the motorcycle's real depth), with synthetic
  maps (random Voronoi layouts, smooth depth fields with objects, Canny edges of synthetic scenes)
  where a record lacks a modality and, with ``vq_train.synthetic_fraction``, mixed in anyway.
* **Tokenizers**: one for all modalities, or one per modality (``vq.per_modality``). Both are one
  parameter tree with a leading *group* axis (1 or 3 groups) and one ``vmap``-ed step.
* **Losses** (``mmsr_jax.vq_losses``): L1/L2 reconstruction, commitment (beta 0.25), codebook loss
  or EMA codebook updates, optional LPIPS perceptual and hinge patch-discriminator terms, and
  dead-code restart.
* **Continuous baseline** (``vq_train.continuous_baseline``): the same encoder/decoder without
  quantisation, trained on the same batches for the same number of steps with its own optimizer,
  so the report compares discrete and continuous reconstruction on the same held-out maps.

``DIR/report.json``: ``recon_psnr`` (modality -> dB on the held-out maps), ``codebook_usage``
(share of codes used on them), ``perplexity``, ``continuous_recon_psnr``, ``codebook_usage_train``
and the held-out split's make-up; ``DIR/reconstructions.png`` shows maps, VQ and continuous
reconstructions; ``DIR/vq.safetensors`` holds the tokenizer for ``config.vq.params`` (and for
``python -m mmsr_jax.tokenize``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import zlib
from typing import Any

import cv2
import grain.python as pygrain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmsr_jax.training import loop
from mmsr_jax.weights import params_io
from mmsr_jax.runtime import sharding
from mmsr_jax.training import vq_losses as L
from mmsr_jax.data.modalities import CANNY_THRESHOLDS, MODALITIES, colorize_seg, render_map
from mmsr_jax.models import vqgan as vqgan_lib

SOURCES = ("demo", "synthetic", "shards")
EXPORT_FILE = "vq.safetensors"
EVAL_SEED = 4321


# ------------------------------------------------------------------------------ synthetic maps
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Smooth random field in about [-1, 1]: a ``cells x cells`` grid upsampled bicubically."""
  g = rng.standard_normal((cells, cells)).astype(np.float32)
  return cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)


def synthetic_seg(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random scene layout: 2-10 warped Voronoi regions with random class labels (int32)."""
  n = int(rng.integers(2, 11))
  seeds = rng.uniform(0, size, (n, 2)).astype(np.float32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  amp = size * float(rng.uniform(0.0, 0.15))
  yy = yy + amp * _smooth_noise(rng, size, 4)
  xx = xx + amp * _smooth_noise(rng, size, 4)
  stretch = rng.uniform(0.5, 2.0, (n, 1, 1)).astype(np.float32)
  d = (yy[None] - seeds[:, 0, None, None]) ** 2 * stretch + (xx[None] - seeds[:, 1, None, None]) ** 2
  labels = rng.integers(1, 151, n).astype(np.int32)  # ADE20K-like class ids
  if rng.random() < 0.3:
    labels[0] = 0  # an unlabelled region
  return labels[np.argmin(d, axis=0)]


def synthetic_depth(rng: np.random.Generator, size: int,
                    seg: np.ndarray | None = None) -> np.ndarray:
  """A smooth depth field in [0, 1] (nearer = brighter): a tilted ground plane, low-frequency
  relief and a few objects at their own depth (regions of ``seg`` or Gaussian blobs)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
  depth = rng.uniform(0.3, 1.0) * yy + rng.uniform(-0.3, 0.3) * xx
  depth = depth + 0.15 * _smooth_noise(rng, size, int(rng.integers(2, 6)))
  if seg is not None and rng.random() < 0.5:
    for label in np.unique(seg)[: int(rng.integers(1, 4))]:
      depth = np.where(seg == label, rng.uniform(0.0, 1.0) + 0.1 * yy, depth)
  else:
    for _ in range(int(rng.integers(0, 4))):
      cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
      depth = depth + rng.uniform(0.2, 0.8) * blob
  depth = cv2.GaussianBlur(depth.astype(np.float32), (0, 0), max(0.5, size / 128))
  lo, hi = float(depth.min()), float(depth.max())
  return ((depth - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def synthetic_edge(rng: np.random.Generator, size: int) -> np.ndarray:
  """Canny edges (the project's thresholds) of a synthetic scene: a coloured layout shaded by a
  depth field, with texture noise; float32 {0, 1}."""
  seg = synthetic_seg(rng, size)
  shade = 0.5 + 0.5 * synthetic_depth(rng, size, seg)
  img = colorize_seg(seg).astype(np.float32) * shade[..., None]
  img = img + rng.uniform(0, 25) * _smooth_noise(rng, size, size // 4)[..., None]
  img = img + rng.uniform(0, 8) * rng.standard_normal(img.shape).astype(np.float32)
  grey = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
  return (cv2.Canny(grey, *CANNY_THRESHOLDS) > 0).astype(np.float32)


def synthetic_map(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """A raw synthetic map of ``kind`` (the input format of ``render_map``)."""
  if kind == "seg":
    return synthetic_seg(rng, size)
  if kind == "depth":
    return synthetic_depth(rng, size, synthetic_seg(rng, size) if rng.random() < 0.5 else None)
  return synthetic_edge(rng, size)


# -------------------------------------------------------------------------------- real records
def _edge_of(image: np.ndarray, size: int) -> np.ndarray:
  """Canny edges of an RGB crop after resizing it to ``size`` (area when shrinking)."""
  h = image.shape[0]
  interp = cv2.INTER_AREA if h >= size else cv2.INTER_CUBIC
  small = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
  grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
  return (cv2.Canny(grey, *CANNY_THRESHOLDS) > 0).astype(np.float32)


def record_maps(record: dict[str, Any], top: int, left: int, side: int, flip: bool,
                size: int) -> dict[str, np.ndarray]:
  """The raw maps a record has, cropped to ``side`` at (top, left) of its *image* frame.

  Stored maps may be smaller than the image (the annotator extracts them from the LR image);
  the crop is scaled onto each map's own frame. Without a stored edge map the edges are Canny on
  the image crop.
  """
  image = record.get("image")
  h, w = image.shape[:2] if image is not None else next(
      record[k].shape for k in MODALITIES if record.get(k) is not None)
  out = {}
  for k in MODALITIES:
    m = record.get(k)
    if m is None:
      continue
    fy, fx = m.shape[0] / h, m.shape[1] / w
    t, l_ = int(round(top * fy)), int(round(left * fx))
    sh, sw = max(1, int(round(side * fy))), max(1, int(round(side * fx)))
    out[k] = m[t:t + sh, l_:l_ + sw]
  if "edge" not in out and image is not None:
    out["edge"] = _edge_of(image[top:top + side, left:left + side], size)
  if flip:
    out = {k: v[:, ::-1] for k, v in out.items()}
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


class ShardRecords:
  """Random-access annotator records (``mmsr_jax.annotate`` ArrayRecord shards) of one split.

  Every ``heldout_every``-th record (by global index) is held out; the rest train.
  """

  def __init__(self, pattern: str, split: str, heldout_every: int):
    self._pattern, self._split, self._every = pattern, split, int(heldout_every)
    files = shard_files(pattern, "config.vq_train.shards")
    self._source = pygrain.ArrayRecordDataSource(files)
    n = len(self._source)
    if self._every < 2:
      raise ValueError(f"config.vq_train.heldout_every={heldout_every}: expected >= 2")
    held = np.arange(0, n, self._every)
    self._index = held if split == "val" else np.setdiff1d(np.arange(n), held)
    if len(self._index) == 0:
      raise ValueError(f"config.vq_train.shards={pattern!r}: no {split} records "
                       f"({n} records, heldout_every={heldout_every})")

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from mmsr_jax import annotate
    return annotate.decode_record(self._source[int(self._index[int(i)])])

  def __repr__(self) -> str:  # grain checks the source of a restored iterator by its repr
    return (f"ShardRecords(pattern={self._pattern!r}, split={self._split!r}, "
            f"heldout_every={self._every})")

  def __getstate__(self):
    return {"pattern": self._pattern, "split": self._split, "every": self._every}

  def __setstate__(self, s):
    self.__init__(s["pattern"], s["split"], s["every"])


def shard_files(pattern: str, field: str) -> list[str]:
  """ArrayRecord files named by a folder (all ``*.array_record`` in it) or a glob."""
  if not pattern:
    raise ValueError(f"{field} is empty: give a folder or glob of ArrayRecord shards")
  files = sorted(glob.glob(os.path.join(pattern, "*.array_record")) if os.path.isdir(pattern)
                 else glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f"{field}={pattern!r}: no ArrayRecord shards found")
  return files


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
    from mmsr_jax.data.sr_examples import DemoSource
    return DemoSource("train")
  if vt.source == "synthetic":
    return SyntheticRecords()
  return ShardRecords(vt.shards, "train", vt.heldout_every)


def make_loader(config) -> pygrain.DataLoader:
  """Infinite, shuffled, per-process-sharded loader of map batches (checkpointable iterator)."""
  from mmsr_jax.data.sr_examples import per_process_batch_size
  vt = config.vq_train
  source = _train_source(config)
  sampler = pygrain.IndexSampler(
      num_records=len(source), shard_options=pygrain.ShardByJaxProcess(drop_remainder=True),
      shuffle=True, num_epochs=None, seed=int(config.seed))
  transform = MakeMapsExample(config.data.map_size, vt.synthetic_fraction,
                              vt.synthetic_for_missing)
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
  real: dict[str, list[np.ndarray]] = {k: [] for k in MODALITIES}
  if vt.source == "demo":
    from mmsr_jax.data import demo
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


# ------------------------------------------------------------------------------------- model
def vq_config(config) -> vqgan_lib.VQGANConfig:
  arch = {k: tuple(v) if isinstance(v, list) else v for k, v in config.vq.arch.to_dict().items()}
  return vqgan_lib.VQGANConfig(**arch, dtype=config.compute_dtype)


def num_groups(config) -> int:
  """1 tokenizer for all modalities, or one per modality."""
  return len(MODALITIES) if config.vq.per_modality else 1


def group_batch(maps: jax.Array, present: jax.Array, groups: int):
  """``[B, 3, M, M, 3]`` -> maps ``[G, N, M, M, 3]``, weights ``[G, N]`` and the edge-map mask
  ``[G, N]`` (G = 1: N = 3B)."""
  is_edge = jnp.broadcast_to(jnp.arange(len(MODALITIES)) == MODALITIES.index("edge"),
                             present.shape)
  if groups == 1:
    return (maps.reshape(1, -1, *maps.shape[2:]), present.reshape(1, -1).astype(jnp.float32),
            is_edge.reshape(1, -1))
  return (jnp.swapaxes(maps, 0, 1), jnp.swapaxes(present, 0, 1).astype(jnp.float32),
          jnp.swapaxes(is_edge, 0, 1))


def _codebook(params) -> jax.Array:
  return params["quantize"]["embedding"]["embedding"]


def _with_codebook(params, codebook):
  q = dict(params["quantize"], embedding=dict(params["quantize"]["embedding"],
                                              embedding=codebook))
  return dict(params, quantize=q)


def _check_config(config) -> None:
  vt = config.vq_train
  if vt.source not in SOURCES:
    raise ValueError(f"config.vq_train.source={vt.source!r}: expected one of {SOURCES}")
  if vt.codebook not in ("ema", "loss"):
    raise ValueError(f"config.vq_train.codebook={vt.codebook!r}: expected 'ema' or 'loss'")
  if not vt.edge_weight >= 1.0:
    raise ValueError(f"config.vq_train.edge_weight={vt.edge_weight}: expected >= 1 (1 = line "
                     "pixels of edge maps weigh like any other pixel)")
  if vt.recon_loss not in ("l1", "l2"):
    raise ValueError(f"config.vq_train.recon_loss={vt.recon_loss!r}: expected 'l1' or 'l2'")
  if vt.perceptual_weight > 0 and not vt.lpips_params:
    raise ValueError("config.vq_train.perceptual_weight > 0 needs config.vq_train.lpips_params "
                     "(LPIPS weights as safetensors, see mmsr_jax.metric_weights)")
  down = 2 ** (len(config.vq.arch.block_out_channels) - 1)
  if config.data.map_size % down:
    raise ValueError(f"config.data.map_size={config.data.map_size} is not divisible by the VQ "
                     f"downsampling factor {down}")
  if vt.source == "shards":
    shard_files(vt.shards, "config.vq_train.shards")


class VQTask:
  """The tokenizer task of ``mmsr_jax.loop``: mesh, model, sharded state, jitted step, report."""

  def __init__(self, config, workdir: str, devices=None):
    _check_config(config)
    self.config, self.workdir = config, workdir
    vt = config.vq_train
    self.mesh = sharding.make_mesh(config, devices)
    self.arch = vq_config(config)
    self.model = vqgan_lib.VQGAN(self.arch)
    self.groups = num_groups(config)
    from mmsr_jax.train import make_optimizer  # the same AdamW + schedule as the DiT trainer
    self.tx, self.lr_fn = make_optimizer(config)
    self.disc = (L.PatchDiscriminator(vt.disc_width, vt.disc_layers) if vt.adv_weight > 0
                 else None)
    self.tx_d = optax.adam(vt.disc_lr, b1=0.5, b2=0.9) if self.disc else None
    if self.disc is not None:
      m = config.data.map_size
      out = jax.eval_shape(lambda: self.disc.init_with_output(
          jax.random.key(0), jnp.zeros((1, m, m, 3)))[0])
      if min(out.shape[1:3]) < 1:
        raise ValueError(f"config.vq_train.disc_layers={vt.disc_layers} is too deep for "
                         f"{m}x{m} maps (no patch logits left); use fewer layers")
    self.lpips = self._load_lpips() if vt.perceptual_weight > 0 else None
    repl = sharding.replicated(self.mesh)
    abstract = jax.eval_shape(self._init_fn, jax.random.key(0))
    self.state_sharding = jax.tree.map(lambda _: repl, abstract)
    self.abstract_state = abstract
    self._init = jax.jit(self._init_fn, out_shardings=self.state_sharding)
    self.train_step = jax.jit(
        self._step_fn, in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_sharding, repl), donate_argnums=(0,))

  # --- Pieces.
  def _load_lpips(self):
    from mmsr_jax.evaluation import lpips as lpips_lib
    vt = self.config.vq_train
    abstract = lpips_lib.abstract_params(vt.lpips_net)
    params = params_io.load_params(vt.lpips_params, abstract["params"],
                                   field="config.vq_train.lpips_params")
    return lpips_lib.LPIPS(vt.lpips_net), {"params": params}

  def _init_group(self, rng):
    m = self.config.data.map_size
    return self.model.init(rng, jnp.zeros((1, m, m, 3)))["params"]

  def _init_fn(self, rng):
    vt, g = self.config.vq_train, self.groups
    k = self.arch.num_vq_embeddings
    r_vq, r_cont, r_d = jax.random.split(rng, 3)
    params = {"vq": jax.vmap(self._init_group)(jax.random.split(r_vq, g))}
    if vt.continuous_baseline:
      params["cont"] = jax.vmap(self._init_group)(jax.random.split(r_cont, g))
    cb = _codebook(params["vq"])
    codes = {"usage": jnp.full((g, k), vt.restart_threshold, jnp.float32)}
    if vt.codebook == "ema":
      codes["cluster_size"] = jnp.ones((g, k), jnp.float32)
      codes["embed_sum"] = cb.astype(jnp.float32)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": {n: self.tx.init(p) for n, p in params.items()}, "codes": codes}
    if self.disc is not None:
      m = self.config.data.map_size
      d_params = self.disc.init(r_d, jnp.zeros((1, m, m, 3)))["params"]
      state["disc"] = d_params
      state["disc_opt"] = self.tx_d.init(d_params)
    return state

  def _perceptual(self, x, x_rec, w):
    if self.lpips is None:
      return jnp.zeros((), jnp.float32)
    net, params = self.lpips
    d = net.apply(params, jnp.clip(x_rec, -1, 1), x)
    return jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0)

  def _pixel_weights(self, x, is_edge):
    vt = self.config.vq_train
    if vt.edge_weight == 1.0:
      return None
    return L.edge_pixel_weights(x, is_edge, vt.edge_weight)

  def _vq_forward(self, params, x, w, is_edge, disc_params, adv_on):
    """One group: loss and diagnostics of the quantised autoencoder."""
    vt = self.config.vq_train
    z = self.model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
    z_st, ids, terms = L.quantize(z, _codebook(params), w)
    x_rec = self.model.apply({"params": params}, z_st, method=vqgan_lib.VQGAN.decode)
    x_rec = x_rec.astype(jnp.float32)
    rec = L.reconstruction(x, x_rec, vt.recon_loss, w, self._pixel_weights(x, is_edge))
    loss = rec + vt.beta * terms["commitment"]
    if vt.codebook == "loss":
      loss = loss + vt.codebook_weight * terms["codebook"]
    perc = self._perceptual(x, x_rec, w)
    loss = loss + vt.perceptual_weight * perc
    adv = jnp.zeros((), jnp.float32)
    if self.disc is not None:
      adv = L.generator_adv_loss(self.disc.apply({"params": disc_params}, x_rec))
      loss = loss + adv_on * vt.adv_weight * adv
    aux = {"recon_loss": rec, "commitment_loss": terms["commitment"],
           "codebook_loss": terms["codebook"], "perceptual_loss": perc, "adv_loss": adv,
           "z": z, "ids": ids, "x_rec": x_rec}
    return loss, aux

  def _cont_forward(self, params, x, w, is_edge):
    """One group: the same autoencoder without quantisation (same loss)."""
    vt = self.config.vq_train
    z = self.model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
    x_rec = self.model.apply({"params": params}, z, method=vqgan_lib.VQGAN.decode)
    x_rec = x_rec.astype(jnp.float32)
    return (L.reconstruction(x, x_rec, vt.recon_loss, w, self._pixel_weights(x, is_edge))
            + vt.perceptual_weight * self._perceptual(x, x_rec, w))

  def _step_fn(self, state, batch):
    config, vt = self.config, self.config.vq_train
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    x, w, is_edge = group_batch(batch["maps"], batch["present"], self.groups)
    adv_on = (step >= vt.disc_start).astype(jnp.float32)
    disc_params = state.get("disc")

    def vq_loss(params):
      losses, aux = jax.vmap(self._vq_forward, in_axes=(0, 0, 0, 0, None, None))(
          params, x, w, is_edge, disc_params, adv_on)
      return jnp.mean(losses), aux

    (loss, aux), grads = jax.value_and_grad(vq_loss, has_aux=True)(state["params"]["vq"])
    updates, opt_vq = self.tx.update(grads, state["opt_state"]["vq"], state["params"]["vq"])
    params_vq = optax.apply_updates(state["params"]["vq"], updates)

    # --- Codebook maintenance, per group: usage EMA, EMA codebook, dead-code restart.
    k = self.arch.num_vq_embeddings
    counts = jax.vmap(lambda i, ww: L.code_counts(i, k, ww))(aux["ids"], w)
    codes = dict(state["codes"])
    codes["usage"] = vt.usage_decay * codes["usage"] + (1 - vt.usage_decay) * counts
    codebook = _codebook(params_vq)
    if vt.codebook == "ema":
      cs, es, codebook = jax.vmap(
          lambda c, e, z, i, ww: L.ema_codebook_update(c, e, z, i, ww, vt.ema_decay))(
              codes["cluster_size"], codes["embed_sum"], aux["z"], aux["ids"], w)
      codes["cluster_size"], codes["embed_sum"] = cs, es
    restart_on = jnp.asarray(False)
    if vt.restart_every > 0:
      restart_on = ((step + 1) % vt.restart_every == 0) & (
          step < int(vt.restart_until * config.num_train_steps))
    new_cb, new_usage, dead = jax.vmap(
        lambda cb, u, z, ww, r: L.restart_dead_codes(cb, u, z, ww, r, vt.restart_threshold,
                                                     vt.restart_noise))(
            codebook, codes["usage"], aux["z"], w, jax.random.split(rng, self.groups))
    dead = dead & restart_on
    codebook = jnp.where(dead[..., None], new_cb, codebook)
    codes["usage"] = jnp.where(dead, new_usage, codes["usage"])
    if vt.codebook == "ema":
      codes["cluster_size"] = jnp.where(dead, 1.0, codes["cluster_size"])
      codes["embed_sum"] = jnp.where(dead[..., None], codebook, codes["embed_sum"])
    params_vq = _with_codebook(params_vq, codebook.astype(_codebook(params_vq).dtype))

    new_state = dict(state, step=step + 1, codes=codes,
                     params=dict(state["params"], vq=params_vq),
                     opt_state=dict(state["opt_state"], vq=opt_vq))
    used = jnp.mean(jax.vmap(L.usage_fraction)(counts))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "recon_loss": jnp.mean(aux["recon_loss"]),
               "commitment_loss": jnp.mean(aux["commitment_loss"]),
               "codebook_loss": jnp.mean(aux["codebook_loss"]),
               "codebook_usage": used,
               "perplexity": jnp.mean(jax.vmap(L.perplexity)(counts)),
               "restarted": jnp.sum(dead).astype(jnp.float32),
               "lr": self.lr_fn(step)}
    if vt.perceptual_weight > 0:
      metrics["perceptual_loss"] = jnp.mean(aux["perceptual_loss"])

    # --- Continuous baseline: same batch, own optimizer.
    if "cont" in state["params"]:
      def cont_loss(params):
        return jnp.mean(jax.vmap(self._cont_forward)(params, x, w, is_edge))
      c_loss, c_grads = jax.value_and_grad(cont_loss)(state["params"]["cont"])
      c_upd, opt_c = self.tx.update(c_grads, state["opt_state"]["cont"], state["params"]["cont"])
      new_state["params"]["cont"] = optax.apply_updates(state["params"]["cont"], c_upd)
      new_state["opt_state"]["cont"] = opt_c
      metrics["cont_loss"] = c_loss

    # --- Patch discriminator (hinge), on all groups' maps at once.
    if self.disc is not None:
      real = x.reshape(-1, *x.shape[2:])
      fake = jax.lax.stop_gradient(aux["x_rec"]).reshape(-1, *x.shape[2:])
      def d_loss_fn(dp):
        lr_ = self.disc.apply({"params": dp}, real)
        lf = self.disc.apply({"params": dp}, fake)
        return L.hinge_d_loss(lr_, lf)
      d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc"])
      d_upd, d_opt = self.tx_d.update(d_grads, state["disc_opt"], state["disc"])
      new_state["disc"] = optax.apply_updates(state["disc"], d_upd)
      new_state["disc_opt"] = d_opt
      metrics["disc_loss"] = d_loss
      metrics["adv_loss"] = jnp.mean(aux["adv_loss"])
    return new_state, metrics

  # --- The task interface of ``mmsr_jax.loop``.
  def init_state(self):
    return self._init(jax.random.key(self.config.seed))

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)

  def step(self, state, batch):
    return self.train_step(state, batch)

  def make_loader(self):
    return make_loader(self.config)

  def write_report(self, workdir: str, state) -> dict:
    return write_report(self, workdir, state)

  @functools.cached_property
  def heldout(self) -> dict[str, dict[str, Any]]:
    """:func:`heldout_maps`, made once for the periodic grids and the report."""
    return heldout_maps(self.config)

  def sample_grid(self, state) -> dict[str, np.ndarray]:
    """Held-out maps and their reconstructions, logged every ``config.sample_every`` steps."""
    n = int(self.config.vq_train.png_examples)
    params = jax.device_get(state["params"])
    rows = []
    for mi, name in enumerate(MODALITIES):
      if name in self.heldout:
        x = self.heldout[name]["maps"][:n]
        g = mi if self.groups > 1 else 0
        row = [x, np.asarray(_reconstruct(self.model, group_params(params["vq"], g), x)[0])]
        if "cont" in params:
          row.append(np.asarray(_reconstruct_continuous(
              self.model, group_params(params["cont"], g), x)))
        rows.append(row)
    return {"reconstructions": _grid(rows)}


# ------------------------------------------------------------------------------------ report
@functools.partial(jax.jit, static_argnums=(0,))
def _reconstruct(model: vqgan_lib.VQGAN, params, x):
  """Quantised reconstruction and ids of one group's maps."""
  ids = model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode_ids)
  return model.apply({"params": params}, ids, method=vqgan_lib.VQGAN.decode_ids), ids


@functools.partial(jax.jit, static_argnums=(0,))
def _reconstruct_continuous(model: vqgan_lib.VQGAN, params, x):
  z = model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
  return model.apply({"params": params}, z, method=vqgan_lib.VQGAN.decode)


def group_params(params, g: int):
  return jax.tree.map(lambda p: p[g], params)


def export_params(task_or_groups, params_vq, path: str) -> None:
  """Writes the tokenizer for ``config.vq.params``: the plain VQGAN tree (one tokenizer) or the
  tree stacked over (depth, seg, edge) (one per modality)."""
  groups = task_or_groups if isinstance(task_or_groups, int) else task_or_groups.groups
  tree = group_params(params_vq, 0) if groups == 1 else params_vq
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  params_io.save_params(tmp, tree)
  os.replace(tmp, path)  # this run's own export, rewritten with its report


def _batched(fn, x: np.ndarray, bs: int = 32):
  outs = [jax.device_get(fn(jnp.asarray(x[i:i + bs]))) for i in range(0, len(x), bs)]
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def write_report(task: VQTask, workdir: str, state) -> dict:
  """Held-out reconstruction quality, codebook usage, the PNG and the exported tokenizer."""
  config = task.config
  params = jax.device_get(state["params"])
  held = task.heldout
  k = task.arch.num_vq_embeddings
  recon, cont, const, counts_all = {}, {}, {}, np.zeros((task.groups, k))
  edge_scores = {}
  rows = []
  n_png = int(config.vq_train.png_examples)
  for mi, name in enumerate(MODALITIES):
    if name not in held:
      continue
    g = mi if task.groups > 1 else 0
    x = held[name]["maps"]
    p = group_params(params["vq"], g)
    x_rec, ids = _batched(lambda b: _reconstruct(task.model, p, b), x)
    recon[name] = _pooled_psnr(x, x_rec)
    # The best constant map (the held-out maps' mean colour): the floor a tokenizer must beat.
    const[name] = _pooled_psnr(x, np.broadcast_to(x.mean(axis=(0, 1, 2)), x.shape))
    counts_all[g] += np.bincount(ids.reshape(-1), minlength=k)
    row = [x[:n_png], x_rec[:n_png]]
    if name == "edge":
      edge_scores["vq"] = _edge_scores(x, x_rec)
    if "cont" in params:
      pc = group_params(params["cont"], g)
      x_c = _batched(lambda b: _reconstruct_continuous(task.model, pc, b), x)
      cont[name] = _pooled_psnr(x, x_c)
      if name == "edge":
        edge_scores["continuous"] = _edge_scores(x, x_c)
      row.append(x_c[:n_png])
    rows.append(row)
  usage = [float(np.mean(c > 0)) for c in counts_all]
  perp = [float(L.perplexity(jnp.asarray(c))) for c in counts_all]
  train_usage = jax.device_get(state["codes"]["usage"])
  metrics = loop.read_metrics(workdir)
  report = {
      "recon_psnr": recon,
      "continuous_recon_psnr": cont,
      "constant_map_psnr": const,
      "edge_f1": edge_scores,
      "codebook_usage": float(np.mean(usage)),
      "perplexity": float(np.mean(perp)),
      "codebook_size": k,
      "token_grid": config.data.map_size // task.arch.downsample_factor,
      "per_modality_tokenizers": bool(task.groups > 1),
      "heldout": {n: {"origin": h["origin"], "num_maps": int(len(h["maps"]))}
                  for n, h in held.items()},
      "codebook_usage_train": float(np.mean(train_usage >= config.vq_train.restart_threshold)),
      "psnr_convention": ("dB of the pooled mean squared error over each modality's held-out "
                          "maps in [0, 1] (rendered 3-channel maps, reconstruction clipped); "
                          "constant_map_psnr: the best constant map (their mean colour)"),
      "edge_f1_convention": ("maps thresholded at 0.5, line pixels matched exactly, counts "
                             "pooled over the held-out edge maps"),
  }
  if task.groups > 1:
    report["codebook_usage_per_modality"] = dict(zip(MODALITIES, usage))
    report["perplexity_per_modality"] = dict(zip(MODALITIES, perp))
  if metrics:
    report["first_train_loss"] = metrics[0]["loss"]
    report["final_train_loss"] = metrics[-1]["loss"]
    report["first_recon_loss"] = metrics[0].get("recon_loss")
    report["final_recon_loss"] = metrics[-1].get("recon_loss")
  png = os.path.join(workdir, "reconstructions.png")
  _write_png(png, rows)
  export_params(task, params["vq"], os.path.join(workdir, EXPORT_FILE))
  report["png"] = os.path.basename(png)
  report["tokenizer"] = EXPORT_FILE
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def _pooled_psnr(x: np.ndarray, x_rec: np.ndarray) -> float:
  return float(jax.device_get(L.pooled_psnr(jnp.asarray(x), jnp.asarray(x_rec))))


def _edge_scores(x: np.ndarray, x_rec: np.ndarray) -> dict[str, float]:
  """Exact-pixel edge precision / recall / F1 (a 1-pixel tolerance is too lenient on the tiny
  32x32 maps, where dilated lines cover half the map)."""
  return {k: float(v) for k, v in jax.device_get(
      L.edge_f1(jnp.asarray(x), jnp.asarray(x_rec), tolerance=0)).items()}


def _write_png(path: str, rows: list[list[np.ndarray]]) -> None:
  """Writes :func:`_grid` as a PNG (nothing when there are no rows)."""
  if rows:
    cv2.imwrite(path, _grid(rows)[..., ::-1])


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
  """One block per modality: the maps (top), VQ reconstructions, continuous reconstructions;
  uint8 RGB, tiny maps enlarged by pixel repetition."""
  blocks = []
  for row in rows:
    lines = [np.concatenate(list(r), axis=1) for r in row]
    blocks.append(np.concatenate(lines, axis=0))
  width = max(b.shape[1] for b in blocks)
  blocks = [np.pad(b, ((0, 4), (0, width - b.shape[1]), (0, 0)), constant_values=1.0)
            for b in blocks]
  img = np.concatenate(blocks, axis=0)
  img = np.round((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8)
  scale = max(1, 512 // img.shape[1])  # nearest-neighbour enlargement of tiny maps
  if scale > 1:
    img = np.repeat(np.repeat(img, scale, 0), scale, 1)
  return img


# --------------------------------------------------------------------------------------- main
def train(config, workdir: str, *, devices=None, stop_at: int | None = None,
          write_report: bool = True):
  """Trains the tokenizer(s) to ``config.num_train_steps`` with the shared loop."""
  loop.check_workdir(config, workdir)
  return loop.run(VQTask(config, workdir, devices), workdir, stop_at=stop_at,
                  write_report=write_report)


main = loop.main(train)  # multi-host runs join their processes first, as in mmsr_jax.train


def define_flags() -> None:
  loop.define_flags("configs/vq_tiny.py",
                    "Directory for checkpoints, logs, the report and vq.safetensors.")


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
