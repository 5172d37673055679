"""Assembles MMSR from a config: device mesh, trainable model, frozen encoders and their weights,
noise schedule, caption tokenizer, and the layout and shardings of the train state. Training,
sampling, the programs compiled ahead of time and the speed benches all build through
:meth:`System.from_config` (the VQ tokenizers' counterpart is ``mmsr_jax/vq_system.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from absl import logging
import jax
import jax.numpy as jnp

from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.diffusion.schedule import Schedule
from mmsr_jax.formats.fingerprint import FROZEN_FIELDS, frozen_path
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.models import build
from mmsr_jax.models.conditioner import Conditioner
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.runtime import sharding
from mmsr_jax.runtime.optimizer import TrainState, make_optimizer
from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.weights import params_io

@dataclasses.dataclass
class System:
  """Everything a run builds once from its config (no weights placed until asked)."""

  config: Any
  mesh: jax.sharding.Mesh
  model: MMSR
  conditioner: Conditioner
  schedule: Schedule
  tokenizer: Any
  tx: Any
  lr_fn: Callable
  init_fn: Callable  # rng -> TrainState (unboxed parameters)
  abstract_state: TrainState
  state_sharding: TrainState
  boxed_params: Any  # abstract parameters with their logical axis names

  @classmethod
  def from_config(cls, config, devices=None) -> "System":
    sr_schema.validate(config)
    devices = list(jax.devices() if devices is None else devices)
    # The devices, not this process's backend, say what the program is compiled for
    # (ahead-of-time compiles for a TPU slice run on a CPU host).
    model = build.mmsr(config, devices[0].platform)
    conditioner = build.conditioner(config)
    tx, lr_fn = make_optimizer(config)
    inputs = dummy_inputs(config, conditioner)

    def init_fn(rng):
      params = nn.unbox(model.init(rng, *inputs)["params"])
      return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), params)

    boxed = jax.eval_shape(lambda r: model.init(r, *inputs)["params"], jax.random.key(0))
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    # The parameters' widths size the FSDP axis of ``mesh.fsdp=-1`` (sharding.mesh_shape).
    mesh = sharding.make_mesh(config, devices, params=boxed)
    _log_mesh(config, mesh, boxed)
    p_sh = sharding.param_shardings(boxed, mesh)
    state_sharding = TrainState(
        step=sharding.replicated(mesh), params=p_sh,
        opt_state=sharding.opt_state_shardings(tx, abstract.opt_state, p_sh, mesh),
        ema_params=p_sh)
    return cls(config, mesh, model, conditioner, Schedule.from_config(config.diffusion),
               make_tokenizer(config.text.tokenizer), tx, lr_fn, init_fn, abstract,
               state_sharding, boxed)

  def abstract_with_shardings(self) -> TrainState:
    """The abstract train state carrying the current mesh's shardings (restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)

  def frozen_params(self, parts=tuple(FROZEN_FIELDS)) -> dict:
    return frozen_params(self.config, self.conditioner, parts)

  def load_frozen(self, parts=tuple(FROZEN_FIELDS), *,
                  host_parts: tuple[str, ...] = ()) -> dict:
    """The frozen weights of ``parts`` placed on the mesh (split over ``fsdp`` when it is > 1);
    the parts in ``host_parts`` are created and kept on the host CPU device instead (e.g.
    T5-XXL while sampling)."""
    if host_parts:
      with jax.default_device(jax.devices("cpu")[0]):
        frozen = self.frozen_params(parts)
    else:
      frozen = self.frozen_params(parts)
    host = {k: jax.device_put(frozen.pop(k), jax.devices("cpu")[0]) for k in host_parts}
    placed = sharding.put(frozen, sharding.frozen_shardings(frozen, self.mesh))
    return {**placed, **host}


def _log_mesh(config, mesh, boxed) -> None:
  """One line when ``fsdp=-1`` gave up chips to ``data`` and a warning when parameters stay
  whole on every chip of an axis their rule splits them over (an explicit mesh whose FSDP axis
  does not divide the model's widths)."""
  shape = dict(mesh.shape)
  if int(config.mesh.fsdp) == -1 and shape["data"] != max(int(config.mesh.data), 1):
    logging.warning("mesh: data=%d fsdp=%d tensor=%d (fsdp=-1 over %d chips: the model's widths "
                 "shard over %d at most)", shape["data"], shape["fsdp"], shape["tensor"],
                 mesh.size, shape["fsdp"])
  whole = sharding.unsharded_params(boxed, mesh)
  if whole:
    path, leaf = next(iter(whole.items()))
    logging.warning("mesh data=%d fsdp=%d tensor=%d: %d parameters (e.g. %s %s) do not divide "
                    "by their axis and are replicated on every chip; mesh.fsdp=-1 picks an "
                    "FSDP axis their widths divide", shape["data"], shape["fsdp"],
                    shape["tensor"], len(whole), path, tuple(leaf.shape))


def frozen_params(config, conditioner: Conditioner, parts=tuple(FROZEN_FIELDS)) -> dict:
  """The frozen encoders' weights on the host: read from the config's paths (checked against
  the architecture), else a deterministic random init from ``config.seed + 1``."""
  rng = jax.random.key(config.seed + 1)
  out = {}
  for part in parts:
    path = frozen_path(config, part)
    if path:
      out[part] = params_io.load_params(path, conditioner.abstract_params(part),
                                        field=f"config.{FROZEN_FIELDS[part]}")
    else:
      out[part] = conditioner.random_params(part, rng)
  return out


def dummy_inputs(config, conditioner: Conditioner, batch: int = 1):
  """Zero inputs of the right shapes for ``MMSR.init``."""
  lat = config.data.hr_size // conditioner.autoencoder.downsample
  c = conditioner.autoencoder.latent_channels
  grid = config.data.map_size // conditioner.vq_downsample
  return (jnp.zeros((batch, lat, lat, c)), jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, lat, lat, c)),
          jnp.zeros((batch, config.text.max_length, config.text.encoder.d_model)),
          jnp.ones((batch, config.text.max_length), jnp.int32),
          jnp.zeros((batch, len(MODALITIES), grid, grid), jnp.int32),
          jnp.ones((batch, len(MODALITIES)), bool))
