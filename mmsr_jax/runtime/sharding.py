"""The ``('data', 'fsdp', 'tensor')`` device mesh, the logical-axis rules that place parameters and
activations on it, and the shardings of the train state, frozen weights and batches.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None = replicated).
RULES = (
    # parameters
    ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
    ("embed_out", None), ("vocab", None), ("latents", None), ("tokens", None),
    ("conv_in", None), ("conv_out", None), ("layers", None),
    # activations
    ("batch", BATCH_AXES), ("length", None), ("act_embed", None),
)


def mesh_shape(config, num_devices: int, params=None, rules=RULES) -> tuple[int, int, int]:
  """``(data, fsdp, tensor)`` sizes from ``config.mesh``; at most one of them may be -1.

  ``fsdp=-1`` with the model's abstract ``params`` (boxed, with logical names) takes the largest
  FSDP axis the model's widths allow: of the divisors of what is left, the one that leaves the
  fewest parameter bytes on each chip (a width the axis does not divide stays whole on every
  chip), the rest of the chips going to ``data``. Both axes split the batch, so the per-chip batch
  is the same either way. DiT-XL's width 1152 divides by 128, not 256: on 256 chips it gets
  ``data=2, fsdp=128`` rather than 256-way FSDP that would shard nothing."""
  sizes = {a: int(config.mesh.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]  # at most one (config.schema.validate)
  known = math.prod(s for s in sizes.values() if s > 0)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"({' x '.join(f'{a}={s}' for a, s in sizes.items() if s > 0)})")
    sizes[fill[0]] = num_devices // known
    if fill == ["fsdp"] and params is not None and sizes["fsdp"] > 1:
      n = sizes["fsdp"]
      # Ties keep the widest FSDP axis (what -1 says), so a model that shards anyway is unchanged.
      best = min((d for d in range(n, 0, -1) if n % d == 0),
                 key=lambda d: param_bytes_per_chip(params, {**sizes, "fsdp": d}, rules))
      sizes["data"] *= n // best
      sizes["fsdp"] = best
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x "
                     f"tensor={sizes['tensor']} needs {math.prod(sizes.values())} devices but "
                     f"{num_devices} are in use")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config, devices=None, params=None) -> Mesh:
  """The ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: every device of every
  process), checked against ``config.batch_size``; ``params`` as in :func:`mesh_shape`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices), params)
  split = shape[0] * shape[1]
  if config.batch_size % split:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {split} "
                     f"batch shards of the mesh (data={shape[0]} x fsdp={shape[1]})")
  arr = None
  if devices[0].platform == "tpu":
    # Physical-topology-aware order on a whole TPU slice (neighbouring chips share the inner
    # axes), whether the devices are this process's or a slice described for an ahead-of-time
    # compile; a subset of a slice has no such order and takes the process-major one.
    from jax.experimental import mesh_utils
    try:
      arr = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
      arr = None
  if arr is None:
    # Process-major order: each process's devices hold a contiguous block of the batch, so the
    # per-host input shards concatenate in process order into the global batch.
    arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
  return Mesh(arr, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``(data, fsdp)``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _fit(spec: P, shape: tuple[int, ...], axis_sizes) -> P:
  """Drops the mesh axes of any dimension they do not divide (that dimension is replicated);
  ``axis_sizes`` maps mesh axis names to sizes (``mesh.shape``)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(axis_sizes[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def _boxed_leaves(boxed_params):
  return jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _split(spec: P, axis_sizes) -> int:
  return math.prod(axis_sizes[a] for axes in spec if axes
                   for a in ((axes,) if isinstance(axes, str) else axes))


def param_bytes_per_chip(boxed_params, axis_sizes, rules=RULES) -> int:
  """Bytes of one copy of the parameters that each chip holds under ``rules`` on a mesh of
  ``axis_sizes`` (no mesh needed: this is how :func:`mesh_shape` compares meshes)."""
  total = 0
  for _, leaf in _boxed_leaves(boxed_params):
    spec = _fit(nn.logical_to_mesh_axes(leaf.names, rules), leaf.value.shape, axis_sizes)
    total += (math.prod(leaf.value.shape) * leaf.value.dtype.itemsize
              // _split(spec, axis_sizes))
  return total


def unsharded_params(boxed_params, mesh: Mesh, rules=RULES) -> dict:
  """The parameters (path -> abstract array) whose logical names ask for a mesh axis of more than one
  device that their width does not divide: they stay whole on every chip of that axis."""
  out = {}
  for path, leaf in _boxed_leaves(boxed_params):
    asked = nn.logical_to_mesh_axes(leaf.names, rules)
    got = _fit(asked, leaf.value.shape, mesh.shape)
    if _split(got, mesh.shape) < _split(asked, mesh.shape):
      out[jax.tree_util.keystr(path)] = leaf.value
  return out


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=RULES):
  """NamedShardings for a (boxed, abstract) Flax parameter tree from its logical axis names.

  Every leaf must carry logical names (``nn.with_logical_partitioning``): a parameter without
  them would silently stay replicated, so it is an error naming the parameter.
  """
  def leaf_spec(path, leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no logical axis names; "
                       "declare it with nn.with_logical_partitioning")
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    return NamedSharding(mesh, _fit(spec, leaf.value.shape, mesh.shape))
  return jax.tree_util.tree_map_with_path(
      leaf_spec, boxed_abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sharding,
                        mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; scalars (counts) are replicated."""
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, params_sharding,
      transform_non_params=lambda _: replicated(mesh))


def frozen_shardings(abstract_params, mesh: Mesh, min_size: int = 2 ** 16):
  """Shardings for frozen encoder weights (T5, VAE, VQGAN: no logical names needed).

  With ``fsdp > 1`` each array of at least ``min_size`` elements is split over ``fsdp`` along its
  largest dimension that the axis divides (T5-XXL alone is 19 GB in float32); smaller arrays and
  everything on a mesh without FSDP are replicated.
  """
  n = mesh.shape["fsdp"]
  def leaf(x):
    if n == 1 or math.prod(x.shape) < min_size:
      return replicated(mesh)
    dims = sorted(range(len(x.shape)), key=lambda d: -x.shape[d])
    for d in dims:
      if x.shape[d] % n == 0:
        spec = [None] * len(x.shape)
        spec[d] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)
  return jax.tree.map(leaf, abstract_params)


def put(tree, shardings):
  """Places a tree of arrays that every process holds whole (frozen weights) onto ``shardings``.

  One process: ``jax.device_put``. Several: each process builds its own shards from its copy
  (``device_put`` refuses shardings with devices of other processes).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  def one(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=RULES):
  """Turns on the activation constraints of the models (``batch``/``length``/``act_embed``)
  while tracing a step for ``mesh``; outside it they are no-ops (e.g. in the sampler)."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy batches into global arrays split over ``(data, fsdp)``.

  Each process passes its own rows (``config.batch_size / process_count`` of them); the global
  batch is their concatenation in process order (see ``make_mesh``).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
