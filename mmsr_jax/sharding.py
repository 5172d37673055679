"""Device mesh, logical-axis rules and the shardings of the train state and batches.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ...). A table of rules maps
each name to a mesh axis or to ``None`` (replicated). With the default rules every parameter is
replicated and the batch is split over the ``data`` axis (data parallelism); sharding parameters
(FSDP / tensor parallelism) is a change of rules and mesh shape, not of model code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data",)

# Logical parameter axis -> mesh axis (None = replicated). Data parallel: everything replicated.
DEFAULT_RULES = (
    ("embed", None), ("embed_out", None), ("mlp", None), ("heads", None), ("vocab", None),
    ("latents", None), ("tokens", None), ("conv_in", None), ("conv_out", None),
)


def make_mesh(config, devices=None) -> Mesh:
  """A ``('data',)`` mesh over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  n = config.mesh.data if config.mesh.data > 0 else len(devices)
  if n != len(devices):
    raise ValueError(f"config.mesh.data={config.mesh.data} but {len(devices)} devices are in use")
  if config.batch_size % n:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n} devices "
                     "of the data axis")
  return Mesh(np.asarray(devices).reshape(n), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a (boxed, abstract) Flax parameter tree from its logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sharding,
                        mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; scalars (counts) are replicated."""
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, params_sharding,
      transform_non_params=lambda _: replicated(mesh))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy batches into global arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
