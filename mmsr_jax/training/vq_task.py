"""The VQ tokenizer training task: one (or one per modality) VQGAN with commitment, codebook or
EMA-codebook terms, dead-code restart, optional LPIPS and patch-discriminator terms, and a
continuous autoencoder trained beside it on the same batches as a baseline."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmsr_jax.data import vq_examples
from mmsr_jax.formats.records import MODALITIES, list_shards
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.runtime import sharding
from mmsr_jax.schema import vq as vq_schema
from mmsr_jax.training import loop, vq_report
from mmsr_jax.training import vq_losses as L
from mmsr_jax.vq_system import VQSystem, codebook_of


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


def _withcodebook_of(params, codebook):
  q = dict(params["quantize"], embedding=dict(params["quantize"]["embedding"],
                                              embedding=codebook))
  return dict(params, quantize=q)


class VQTask:
  """The tokenizer task of ``mmsr_jax.training.loop``: the jitted step and the report, around the
  :class:`~mmsr_jax.vq_system.VQSystem` it builds."""

  def __init__(self, config, workdir: str, devices=None):
    vq_schema.validate(config)
    if config.vq_train.source == "shards":  # fails early when there are none
      list_shards(config.vq_train.shards, "config.vq_train.shards")
    self.config, self.workdir = config, workdir
    self.system = s = VQSystem.from_config(config, devices)
    self._init = jax.jit(s.init_fn, out_shardings=s.state_sharding)
    self.train_step = jax.jit(
        self._step_fn, in_shardings=(s.state_sharding, sharding.batch_sharding(s.mesh)),
        out_shardings=(s.state_sharding, sharding.replicated(s.mesh)), donate_argnums=(0,))

  # --- Pieces.
  def _perceptual(self, x, x_rec, w):
    if self.system.lpips is None:
      return jnp.zeros((), jnp.float32)
    net, params = self.system.lpips
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
    z = self.system.model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
    z_st, ids, terms = L.quantize(z, codebook_of(params), w)
    x_rec = self.system.model.apply({"params": params}, z_st, method=vqgan_lib.VQGAN.decode)
    x_rec = x_rec.astype(jnp.float32)
    rec = L.reconstruction(x, x_rec, vt.recon_loss, w, self._pixel_weights(x, is_edge))
    loss = rec + vt.beta * terms["commitment"]
    if vt.codebook == "loss":
      loss = loss + vt.codebook_weight * terms["codebook"]
    perc = self._perceptual(x, x_rec, w)
    loss = loss + vt.perceptual_weight * perc
    adv = jnp.zeros((), jnp.float32)
    if self.system.disc is not None:
      adv = L.generator_adv_loss(self.system.disc.apply({"params": disc_params}, x_rec))
      loss = loss + adv_on * vt.adv_weight * adv
    aux = {"recon_loss": rec, "commitment_loss": terms["commitment"],
           "codebook_loss": terms["codebook"], "perceptual_loss": perc, "adv_loss": adv,
           "z": z, "ids": ids, "x_rec": x_rec}
    return loss, aux

  def _cont_forward(self, params, x, w, is_edge):
    """One group: the same autoencoder without quantisation (same loss)."""
    vt = self.config.vq_train
    z = self.system.model.apply({"params": params}, x, method=vqgan_lib.VQGAN.encode)
    x_rec = self.system.model.apply({"params": params}, z, method=vqgan_lib.VQGAN.decode)
    x_rec = x_rec.astype(jnp.float32)
    return (L.reconstruction(x, x_rec, vt.recon_loss, w, self._pixel_weights(x, is_edge))
            + vt.perceptual_weight * self._perceptual(x, x_rec, w))

  def _step_fn(self, state, batch):
    config, vt, tx = self.config, self.config.vq_train, self.system.tx
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    x, w, is_edge = group_batch(batch["maps"], batch["present"], self.system.groups)
    adv_on = (step >= vt.disc_start).astype(jnp.float32)
    disc_params = state.get("disc")

    def vq_loss(params):
      losses, aux = jax.vmap(self._vq_forward, in_axes=(0, 0, 0, 0, None, None))(
          params, x, w, is_edge, disc_params, adv_on)
      return jnp.mean(losses), aux

    (loss, aux), grads = jax.value_and_grad(vq_loss, has_aux=True)(state["params"]["vq"])
    updates, opt_vq = tx.update(grads, state["opt_state"]["vq"], state["params"]["vq"])
    params_vq = optax.apply_updates(state["params"]["vq"], updates)

    # --- Codebook maintenance, per group: usage EMA, EMA codebook, dead-code restart.
    k = self.system.arch.num_vq_embeddings
    counts = jax.vmap(lambda i, ww: L.code_counts(i, k, ww))(aux["ids"], w)
    codes = dict(state["codes"])
    codes["usage"] = vt.usage_decay * codes["usage"] + (1 - vt.usage_decay) * counts
    codebook = codebook_of(params_vq)
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
            codebook, codes["usage"], aux["z"], w, jax.random.split(rng, self.system.groups))
    dead = dead & restart_on
    codebook = jnp.where(dead[..., None], new_cb, codebook)
    codes["usage"] = jnp.where(dead, new_usage, codes["usage"])
    if vt.codebook == "ema":
      codes["cluster_size"] = jnp.where(dead, 1.0, codes["cluster_size"])
      codes["embed_sum"] = jnp.where(dead[..., None], codebook, codes["embed_sum"])
    params_vq = _withcodebook_of(params_vq, codebook.astype(codebook_of(params_vq).dtype))

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
               "lr": self.system.lr_fn(step)}
    if vt.perceptual_weight > 0:
      metrics["perceptual_loss"] = jnp.mean(aux["perceptual_loss"])

    # --- Continuous baseline: same batch, own optimizer.
    if "cont" in state["params"]:
      def cont_loss(params):
        return jnp.mean(jax.vmap(self._cont_forward)(params, x, w, is_edge))
      c_loss, c_grads = jax.value_and_grad(cont_loss)(state["params"]["cont"])
      c_upd, opt_c = tx.update(c_grads, state["opt_state"]["cont"], state["params"]["cont"])
      new_state["params"]["cont"] = optax.apply_updates(state["params"]["cont"], c_upd)
      new_state["opt_state"]["cont"] = opt_c
      metrics["cont_loss"] = c_loss

    # --- Patch discriminator (hinge), on all groups' maps at once.
    if self.system.disc is not None:
      real = x.reshape(-1, *x.shape[2:])
      fake = jax.lax.stop_gradient(aux["x_rec"]).reshape(-1, *x.shape[2:])
      def d_loss_fn(dp):
        lr_ = self.system.disc.apply({"params": dp}, real)
        lf = self.system.disc.apply({"params": dp}, fake)
        return L.hinge_d_loss(lr_, lf)
      d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc"])
      d_upd, d_opt = self.system.tx_d.update(d_grads, state["disc_opt"], state["disc"])
      new_state["disc"] = optax.apply_updates(state["disc"], d_upd)
      new_state["disc_opt"] = d_opt
      metrics["disc_loss"] = d_loss
      metrics["adv_loss"] = jnp.mean(aux["adv_loss"])
    return new_state, metrics

  # --- The task interface of the loop.
  @property
  def mesh(self):
    return self.system.mesh

  def init_state(self):
    return self._init(jax.random.key(self.config.seed))

  def abstract_with_shardings(self):
    return self.system.abstract_with_shardings()

  def step(self, state, batch):
    return self.train_step(state, batch)

  def make_loader(self):
    return vq_examples.make_loader(self.config)

  def write_report(self, workdir: str, state) -> dict:
    return vq_report.write_report(self, workdir, state)

  @functools.cached_property
  def heldout(self) -> dict[str, dict[str, Any]]:
    """:func:`heldout_maps`, made once for the periodic grids and the report."""
    return vq_examples.heldout_maps(self.config)

  def sample_grid(self, state) -> dict[str, np.ndarray]:
    """Held-out maps and their reconstructions, logged every ``config.sample_every`` steps."""
    n = int(self.config.vq_train.png_examples)
    params = jax.device_get(state["params"])
    rows = []
    for mi, name in enumerate(MODALITIES):
      if name in self.heldout:
        x = self.heldout[name]["maps"][:n]
        g = mi if self.system.groups > 1 else 0
        row = [x, np.asarray(vq_report.reconstruct(
            self.system.model, vq_report.group_params(params["vq"], g), x)[0])]
        if "cont" in params:
          row.append(np.asarray(vq_report.reconstruct_continuous(
              self.system.model, vq_report.group_params(params["cont"], g), x)))
        rows.append(row)
    return {"reconstructions": vq_report.grid(rows)}


def train(config, workdir: str, *, devices=None, stop_at: int | None = None,
          write_report: bool = True, restore_step: int | None = None):
  """Trains the tokenizer(s) to ``config.num_train_steps`` with the shared loop."""
  vq_schema.validate(config)
  loop.check_workdir(config, workdir)
  return loop.run(VQTask(config, workdir, devices), workdir, stop_at=stop_at,
                  write_report=write_report, restore_step=restore_step)
