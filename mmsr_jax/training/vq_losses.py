"""Losses and codebook maintenance of the VQ tokenizers as pure array functions: straight-through
quantisation with commitment / codebook terms, EMA codebook, dead-code restart, reconstruction,
hinge discriminator, usage and perplexity; every mean weighted by map presence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmsr_jax.evaluation import metrics

Array = jax.Array
sg = jax.lax.stop_gradient


def _wmean(x: Array, w: Array | None) -> Array:
  """Mean of ``x`` over all axes, rows weighted by ``w`` (broadcast over trailing axes)."""
  if w is None:
    return jnp.mean(x)
  w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim)).astype(x.dtype)
  w = jnp.broadcast_to(w, x.shape)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def nearest_codes(z: Array, codebook: Array) -> Array:
  """``argmin_k ||z - e_k||^2`` over the last axis of ``z`` (float32, exact matmul)."""
  e = codebook.astype(jnp.float32)
  zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  scores = jnp.sum(e * e, axis=-1)[None, :] - 2.0 * jnp.matmul(
      zf, e.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def quantize(z: Array, codebook: Array, w: Array | None = None
             ) -> tuple[Array, Array, dict[str, Array]]:
  """Quantises ``z [..., D]`` with ``codebook [K, D]``.

  Args:
    z: encoder outputs (after quant_conv).
    codebook: the code vectors.
    w: optional per-token weights of shape ``z.shape[:-1]`` (or a prefix of it).

  Returns:
    ``(z_st, ids, terms)``: ``z_st`` has the value of the chosen codes and the gradient of ``z``
    (straight-through), ``ids`` int32 ``z.shape[:-1]``, and ``terms`` the unweighted
    ``commitment`` and ``codebook`` mean squared errors (weighted over tokens by ``w``; the mean
    also runs over the D channels, as in the usual implementations).
  """
  ids = nearest_codes(z, codebook)
  z_q = jnp.take(codebook.astype(jnp.float32), ids, axis=0)
  zf = z.astype(jnp.float32)
  terms = {
      "commitment": _wmean(jnp.square(zf - sg(z_q)), w),
      "codebook": _wmean(jnp.square(sg(zf) - z_q), w),
  }
  z_st = zf + sg(z_q - zf)
  return z_st.astype(z.dtype), ids, terms


def code_counts(ids: Array, num_codes: int, w: Array | None = None) -> Array:
  """How many (weighted) tokens picked each code: float32 ``[K]``."""
  flat = ids.reshape(-1)
  weights = None if w is None else jnp.broadcast_to(
      w.reshape(w.shape + (1,) * (ids.ndim - w.ndim)), ids.shape).reshape(-1).astype(jnp.float32)
  return jnp.bincount(flat, weights=weights, length=num_codes).astype(jnp.float32)


def perplexity(counts: Array) -> Array:
  """``exp(entropy)`` of the code distribution given by ``counts`` (1 .. K)."""
  p = counts / jnp.maximum(counts.sum(), 1e-9)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def usage_fraction(counts: Array) -> Array:
  """Share of codes picked at least once (0 .. 1)."""
  return jnp.mean((counts > 0).astype(jnp.float32))


def ema_codebook_update(cluster_size: Array, embed_sum: Array, z: Array, ids: Array,
                        w: Array | None, decay: float, eps: float = 1e-5
                        ) -> tuple[Array, Array, Array]:
  """One EMA step of the codebook (the codebook-loss-free variant of VQ-VAE).

  ``cluster_size [K]`` and ``embed_sum [K, D]`` are running averages of how many tokens picked
  each code and of their summed encoder outputs; the new codes are their ratio, with the cluster
  sizes Laplace-smoothed so that an unused code does not divide by zero.

  Returns:
    ``(cluster_size, embed_sum, codebook)``, all float32.
  """
  k, d = embed_sum.shape
  flat = ids.reshape(-1)
  weights = jnp.ones(flat.shape, jnp.float32) if w is None else jnp.broadcast_to(
      w.reshape(w.shape + (1,) * (ids.ndim - w.ndim)), ids.shape).reshape(-1).astype(jnp.float32)
  zf = sg(z).astype(jnp.float32).reshape(-1, d)
  counts = jax.ops.segment_sum(weights, flat, num_segments=k)
  sums = jax.ops.segment_sum(zf * weights[:, None], flat, num_segments=k)
  cluster_size = decay * cluster_size + (1 - decay) * counts
  embed_sum = decay * embed_sum + (1 - decay) * sums
  n = cluster_size.sum()
  smoothed = (cluster_size + eps) / (n + k * eps) * n
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead_codes(codebook: Array, usage: Array, z: Array, w: Array | None, rng: Array,
                       threshold: float, noise: float = 0.0) -> tuple[Array, Array, Array]:
  """Moves every code whose ``usage`` is below ``threshold`` onto a random encoder output.

  Args:
    codebook: ``[K, D]``.
    usage: ``[K]`` running usage (e.g. an EMA of the per-step pick counts).
    z: encoder outputs of the current batch, ``[..., D]``.
    w: optional per-token weights; only tokens with weight > 0 are candidates.
    rng: PRNG key choosing the tokens.
    threshold: usage below which a code counts as dead.
    noise: std of Gaussian noise added to a revived code (relative to the batch's std of z), so
      that two codes revived on the same token do not coincide.

  Returns:
    ``(codebook, usage, dead)``: revived codes replaced, their usage set to ``threshold`` (so they
    get a fair chance before they can be restarted again), and the bool ``[K]`` mask of the codes
    that were restarted.
  """
  k, d = codebook.shape
  zf = sg(z).astype(jnp.float32).reshape(-1, d)
  if w is None:
    logits = jnp.zeros((zf.shape[0],), jnp.float32)
  else:
    ww = jnp.broadcast_to(w.reshape(w.shape + (1,) * (z.ndim - 1 - w.ndim)), z.shape[:-1])
    logits = jnp.where(ww.reshape(-1) > 0, 0.0, -jnp.inf)
  r_pick, r_noise = jax.random.split(rng)
  pick = jax.random.categorical(r_pick, logits, shape=(k,))
  new = zf[pick]
  if noise > 0:
    new = new + noise * jnp.std(zf) * jax.random.normal(r_noise, new.shape)
  dead = usage < threshold
  codebook = jnp.where(dead[:, None], new.astype(codebook.dtype), codebook)
  usage = jnp.where(dead, jnp.asarray(threshold, usage.dtype), usage)
  return codebook, usage, dead


def reconstruction(x: Array, x_rec: Array, kind: str, w: Array | None = None,
                   pixel_w: Array | None = None) -> Array:
  """Per-pixel L1 or L2 reconstruction loss, weighted per example by ``w``.

  ``pixel_w`` (optional, broadcastable to ``x``, e.g. ``[N, H, W, 1]``) weighs pixels inside each
  example: the example's loss is then ``sum(pixel_w * err) / sum(pixel_w)``, so re-weighting
  moves emphasis between an example's pixels without changing its share of the batch. Uniform
  weights give the plain mean.
  """
  diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "l1":
    err = jnp.abs(diff)
  elif kind == "l2":
    err = jnp.square(diff)
  else:
    raise ValueError(f"config.vq_train.recon_loss={kind!r}: expected 'l1' or 'l2'")
  if pixel_w is None:
    return _wmean(err, w)
  pw = jnp.broadcast_to(pixel_w.astype(jnp.float32), err.shape)
  axes = tuple(range(1, err.ndim))
  per_example = jnp.sum(pw * err, axis=axes) / jnp.maximum(jnp.sum(pw, axis=axes), 1e-8)
  return _wmean(per_example, w)


def edge_pixel_weights(x: Array, is_edge: Array, edge_weight: float) -> Array:
  """Pixel weights ``[N, H, W, 1]`` that make line pixels of edge maps count ``edge_weight`` times.

  Canny maps are sparse binary lines (about 5-15% of pixels); with uniform weights a small
  tokenizer minimises its loss by drawing no edges at all. ``x`` holds rendered maps in [-1, 1]
  (``[N, H, W, C]``), ``is_edge`` marks which examples are edge maps (``[N]``); a pixel of an edge
  map is on a line when its first channel is above 0 (0.5 in [0, 1]). Other maps get weight 1.
  """
  on = (x[..., :1].astype(jnp.float32) > 0.0).astype(jnp.float32)
  sel = is_edge.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 1.0 + (float(edge_weight) - 1.0) * on * sel


def edge_f1(x: Array, x_rec: Array, tolerance: int = 1) -> dict[str, Array]:
  """Precision, recall and F1 of reconstructed edge maps (``[N, H, W, C]`` in [-1, 1]),
  thresholded at 0 (0.5 in [0, 1]) on channel 0 and scored by
  :func:`mmsr_jax.evaluation.metrics.edge_f1` within ``tolerance`` pixels."""
  return metrics.edge_f1(x_rec[..., 0].astype(jnp.float32) > 0.0, x[..., 0] > 0.0,
                         tolerance=tolerance)


def psnr(x: Array, x_rec: Array) -> Array:
  """PSNR in dB of images in [-1, 1] (computed on [0, 1], the reconstruction clipped)."""
  a = (jnp.clip(x_rec.astype(jnp.float32), -1, 1) + 1) / 2
  b = (x.astype(jnp.float32) + 1) / 2
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def pooled_psnr(x: Array, x_rec: Array) -> Array:
  """PSNR in dB of a whole set of maps: of their pooled mean squared error (same convention as
  :func:`psnr`). Unlike the mean of per-map PSNRs it is not dominated by near-empty maps (an
  all-black edge map reconstructed almost exactly scores 60+ dB on its own)."""
  a = (jnp.clip(x_rec.astype(jnp.float32), -1, 1) + 1) / 2
  b = (x.astype(jnp.float32) + 1) / 2
  return 10.0 * jnp.log10(1.0 / jnp.maximum(jnp.mean(jnp.square(a - b)), 1e-10))


# ------------------------------------------------------------------------------- discriminator
def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Discriminator hinge loss: mean relu(1 - D(x)) + mean relu(1 + D(G(x))), halved."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: Array) -> Array:
  """The generator's side of the hinge GAN: -mean D(G(x))."""
  return -jnp.mean(logits_fake)


def tree_l2(tree: Any) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
