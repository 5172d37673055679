"""The VQ tokenizer run's report: held-out PSNR of the VQ and continuous reconstructions against
the best constant map, exact-pixel edge F1, codebook usage and perplexity, the reconstruction PNG,
and the exported tokenizer (``vq.safetensors``) for ``config.vq.params``."""

from __future__ import annotations

import functools
import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.training import loop
from mmsr_jax.training import vq_losses as L
from mmsr_jax.weights import params_io

EXPORT_FILE = "vq.safetensors"


@functools.partial(jax.jit, static_argnums=(0,))
def reconstruct(model: vqgan_lib.VQGAN, params, x):
  """Quantised reconstruction and ids of one group's maps."""
  ids = model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode_ids)
  return model.apply({"params": params}, ids, method=vqgan_lib.VQGAN.decode_ids), ids


@functools.partial(jax.jit, static_argnums=(0,))
def reconstruct_continuous(model: vqgan_lib.VQGAN, params, x):
  z = model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
  return model.apply({"params": params}, z, method=vqgan_lib.VQGAN.decode)


def group_params(params, g: int):
  return jax.tree.map(lambda p: p[g], params)


def export_params(task_or_groups, params_vq, path: str) -> None:
  """Writes the tokenizer for ``config.vq.params``: the plain VQGAN tree (one tokenizer) or the
  tree stacked over (depth, seg, edge) (one per modality)."""
  groups = (task_or_groups if isinstance(task_or_groups, int)
            else task_or_groups.system.groups)
  tree = group_params(params_vq, 0) if groups == 1 else params_vq
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  params_io.save_params(tmp, tree)
  os.replace(tmp, path)  # this run's own export, rewritten with its report


def _batched(fn, x: np.ndarray, bs: int = 32):
  outs = [jax.device_get(fn(jnp.asarray(x[i:i + bs]))) for i in range(0, len(x), bs)]
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def write_report(task, workdir: str, state) -> dict:
  """Held-out reconstruction quality, codebook usage, the PNG and the exported tokenizer."""
  config = task.config
  params = jax.device_get(state["params"])
  held = task.heldout
  k = task.system.arch.num_vq_embeddings
  recon, cont, const, counts_all = {}, {}, {}, np.zeros((task.system.groups, k))
  edge_scores = {}
  tol = int(config.vq_train.get("edge_tolerance", 0))
  rows = []
  n_png = int(config.vq_train.png_examples)
  for mi, name in enumerate(MODALITIES):
    if name not in held:
      continue
    g = mi if task.system.groups > 1 else 0
    x = held[name]["maps"]
    p = group_params(params["vq"], g)
    x_rec, ids = _batched(lambda b: reconstruct(task.system.model, p, b), x)
    recon[name] = _pooled_psnr(x, x_rec)
    # The best constant map (the held-out maps' mean colour): the floor a tokenizer must beat.
    const[name] = _pooled_psnr(x, np.broadcast_to(x.mean(axis=(0, 1, 2)), x.shape))
    counts_all[g] += np.bincount(ids.reshape(-1), minlength=k)
    row = [x[:n_png], x_rec[:n_png]]
    if name == "edge":
      edge_scores["vq"] = _edge_scores(x, x_rec, tol)
      # The floor: a line everywhere. Within a tolerance it is no longer near zero on dense
      # maps (most pixels lie near some line), so a score means little without it.
      edge_scores["all_lines"] = _edge_scores(x, np.ones_like(x), tol)
      if tol:
        edge_scores["vq_exact"] = _edge_scores(x, x_rec, 0)
        edge_scores["all_lines_exact"] = _edge_scores(x, np.ones_like(x), 0)
    if "cont" in params:
      pc = group_params(params["cont"], g)
      x_c = _batched(lambda b: reconstruct_continuous(task.system.model, pc, b), x)
      cont[name] = _pooled_psnr(x, x_c)
      if name == "edge":
        edge_scores["continuous"] = _edge_scores(x, x_c, tol)
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
      "token_grid": config.data.map_size // task.system.arch.downsample_factor,
      "per_modality_tokenizers": bool(task.system.groups > 1),
      "heldout": {n: {"origin": h["origin"], "num_maps": int(len(h["maps"]))}
                  for n, h in held.items()},
      "codebook_usage_train": float(np.mean(train_usage >= config.vq_train.restart_threshold)),
      "psnr_convention": ("dB of the pooled mean squared error over each modality's held-out "
                          "maps in [0, 1] (rendered 3-channel maps, reconstruction clipped); "
                          "constant_map_psnr: the best constant map (their mean colour)"),
      "edge_f1_convention": (f"maps thresholded at 0.5, a line pixel matched within {tol} "
                             "pixels (Chebyshev; *_exact: exactly), counts pooled over the "
                             "held-out edge maps; all_lines: a map with a line everywhere"),
  }
  if task.system.groups > 1:
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


def _edge_scores(x: np.ndarray, x_rec: np.ndarray, tolerance: int) -> dict[str, float]:
  """Edge precision / recall / F1 within ``tolerance`` pixels (``config.vq_train.edge_tolerance``;
  0 on the tiny 32x32 maps, where one-pixel dilated lines cover half the map)."""
  return {k: float(v) for k, v in jax.device_get(
      L.edge_f1(jnp.asarray(x), jnp.asarray(x_rec), tolerance=tolerance)).items()}


def _write_png(path: str, rows: list[list[np.ndarray]]) -> None:
  """Writes :func:`_grid` as a PNG (nothing when there are no rows)."""
  if rows:
    cv2.imwrite(path, grid(rows)[..., ::-1])


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
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
