"""Assembles the VQ tokenizer training system from a config: device mesh, VQGAN (one, or one per
modality), optimizer, the optional patch discriminator and LPIPS net, and the layout and
shardings of the train state. The counterpart of :class:`mmsr_jax.system.System` for
``python -m mmsr_jax.train_vq``: the task (``mmsr_jax/training/vq_task.py``) builds through
:meth:`VQSystem.from_config`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mmsr_jax.evaluation import lpips as lpips_lib
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.models import build
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.models.discriminator import PatchDiscriminator
from mmsr_jax.runtime import sharding
from mmsr_jax.runtime.optimizer import make_optimizer
from mmsr_jax.schema import vq as vq_schema
from mmsr_jax.weights import params_io


def num_groups(config) -> int:
  """1 tokenizer for all modalities, or one per modality."""
  return len(MODALITIES) if config.vq.per_modality else 1


def codebook_of(params) -> jax.Array:
  return params["quantize"]["embedding"]["embedding"]


@dataclasses.dataclass
class VQSystem:
  """Everything a VQ run builds once from its config (no state placed until asked)."""

  config: Any
  mesh: jax.sharding.Mesh
  arch: vqgan_lib.VQGANConfig
  model: vqgan_lib.VQGAN
  groups: int  # VQGANs trained side by side (num_groups)
  tx: Any
  lr_fn: Callable
  disc: PatchDiscriminator | None  # with config.vq_train.adv_weight > 0
  tx_d: Any
  lpips: tuple | None  # (LPIPS net, its variables) with config.vq_train.perceptual_weight > 0
  init_fn: Callable  # rng -> train state (a dict)
  abstract_state: dict
  state_sharding: dict

  @classmethod
  def from_config(cls, config, devices=None) -> "VQSystem":
    vq_schema.validate(config)
    vt = config.vq_train
    mesh = sharding.make_mesh(config, devices)
    arch = build.vq_arch(config, config.compute_dtype)
    model = vqgan_lib.VQGAN(arch)
    groups = num_groups(config)
    tx, lr_fn = make_optimizer(config)
    disc = PatchDiscriminator(vt.disc_width, vt.disc_layers) if vt.adv_weight > 0 else None
    tx_d = optax.adam(vt.disc_lr, b1=0.5, b2=0.9) if disc else None
    if disc is not None:
      m = config.data.map_size
      out = jax.eval_shape(lambda: disc.init_with_output(
          jax.random.key(0), jnp.zeros((1, m, m, 3)))[0])
      if min(out.shape[1:3]) < 1:
        raise ValueError(f"config.vq_train.disc_layers={vt.disc_layers} is too deep for "
                         f"{m}x{m} maps (no patch logits left); use fewer layers")
    lpips = load_lpips(config) if vt.perceptual_weight > 0 else None

    def init_fn(rng):
      return init_state(config, model, groups, tx, disc, tx_d, rng)

    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    repl = sharding.replicated(mesh)
    return cls(config, mesh, arch, model, groups, tx, lr_fn, disc, tx_d, lpips, init_fn,
               abstract, jax.tree.map(lambda _: repl, abstract))

  def abstract_with_shardings(self) -> dict:
    """The abstract train state carrying the current mesh's shardings (restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)


def load_lpips(config):
  """The LPIPS net of the perceptual term and its weights (``config.vq_train.lpips_params``)."""
  vt = config.vq_train
  abstract = lpips_lib.abstract_params(vt.lpips_net)
  params = params_io.load_params(vt.lpips_params, abstract["params"],
                                 field="config.vq_train.lpips_params")
  return lpips_lib.LPIPS(vt.lpips_net), {"params": params}


def init_state(config, model, groups: int, tx, disc, tx_d, rng) -> dict:
  """The initial train state: the VQGANs (and the continuous baseline's) stacked over the
  groups, their optimizer states, the codebook statistics, the discriminator's."""
  vt, m = config.vq_train, config.data.map_size
  k = model.config.num_vq_embeddings

  def init_group(r):
    return model.init(r, jnp.zeros((1, m, m, 3)))["params"]

  r_vq, r_cont, r_d = jax.random.split(rng, 3)
  params = {"vq": jax.vmap(init_group)(jax.random.split(r_vq, groups))}
  if vt.continuous_baseline:
    params["cont"] = jax.vmap(init_group)(jax.random.split(r_cont, groups))
  codes = {"usage": jnp.full((groups, k), vt.restart_threshold, jnp.float32)}
  if vt.codebook == "ema":
    codes["cluster_size"] = jnp.ones((groups, k), jnp.float32)
    codes["embed_sum"] = codebook_of(params["vq"]).astype(jnp.float32)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": {n: tx.init(p) for n, p in params.items()}, "codes": codes}
  if disc is not None:
    d_params = disc.init(r_d, jnp.zeros((1, m, m, 3)))["params"]
    state["disc"] = d_params
    state["disc_opt"] = tx_d.init(d_params)
  return state
