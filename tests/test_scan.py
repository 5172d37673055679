"""Scanned layer stacks (``nn.scan`` over stacked parameters) equal the same blocks applied one
after another with each layer's slice of the parameters, forward and gradients, with and without
rematerialisation; and the attention kernels resolve as documented."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.models import context, dit, layers, t5


class _Stack(nn.Module):
  block: type
  args: tuple
  depth: int
  remat: str
  broadcast: int

  @nn.compact
  def __call__(self, x, *extra):
    scanned = layers.scan_blocks(self.block, depth=self.depth, remat=self.remat,
                                 broadcast=self.broadcast)
    return scanned(*self.args, name="blocks")(x, *extra)[0]


def _init(stack, x, extra, seed=2):
  """Random parameters of ``stack``, every leaf (not only the ones its initialisers make
  non-zero); from NumPy and the parameter shapes, so nothing is compiled."""
  shapes = jax.eval_shape(lambda: nn.unbox(stack.init(jax.random.key(0), x, *extra)["params"]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _rel(a, b) -> float:
  """Largest difference relative to the largest magnitude of the reference."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _loop(block, args, params, x, extra, depth):
  for i in range(depth):
    layer = jax.tree.map(lambda a: a[i], params)  # noqa: B023
    x, _ = block(*args).apply({"params": layer}, x, *extra)
  return x


CASES = {
    "dit": (dit.DiTBlock, (32, 4), lambda r: (jax.random.normal(r[0], (2, 12, 32)),
                                              (jax.random.normal(r[1], (2, 6 * 32)),
                                               jax.random.normal(r[2], (2, 5, 32)), None))),
    "mmlc": (context.ConnectorBlock, (32, 4),
             lambda r: (jax.random.normal(r[0], (2, 6, 32)),
                        (jax.random.normal(r[1], (2, 9, 32)),
                         jnp.arange(9)[None].repeat(2, 0) < jnp.array([[9], [5]]),
                         jax.random.uniform(r[2], (2, 9), minval=0.5, maxval=2.0)))),
    "t5": (t5.T5Block, (t5.T5Config.tiny(),),
           lambda r: (jax.random.normal(r[0], (2, 7, 64)),
                      (jnp.ones((2, 1, 1, 7), bool).at[1, ..., 5:].set(False),
                       jax.random.normal(r[1], (1, 4, 7, 7))))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_loop_forward_and_gradients(name, remat):
  block, args, make = CASES[name]
  depth = 3
  x, extra = jax.jit(make)(jax.random.split(jax.random.key(1), 3))
  stack = _Stack(block, args, depth, remat, len(extra))
  params = _init(stack, x, extra)
  stacked = params["blocks"]
  assert all(a.shape[0] == depth for a in jax.tree.leaves(stacked))

  def scanned(p, x):
    return jnp.sum(jnp.sin(stack.apply({"params": p}, x, *extra)))

  def looped(p, x):
    return jnp.sum(jnp.sin(_loop(block, args, p["blocks"], x, extra, depth)))

  f_s, (gp_s, gx_s) = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1)))(params, x)
  f_l, (gp_l, gx_l) = jax.jit(jax.value_and_grad(looped, argnums=(0, 1)))(params, x)
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
  for a, b in ((f_s, f_l), (gx_s, gx_l), (flat(gp_s), flat(gp_l))):
    assert _rel(a, b) <= 1e-5, (name, remat, _rel(a, b))
  assert float(jnp.abs(gx_l).max()) > 1e-3  # the gradients are not trivially zero


def test_scan_would_catch_a_misordered_stack():
  """The comparison above can fail: reversing the layer order changes the output."""
  block, args, make = CASES["dit"]
  x, extra = jax.jit(make)(jax.random.split(jax.random.key(1), 3))
  stack = _Stack(block, args, 3, "none", len(extra))
  params = _init(stack, x, extra)
  reversed_layers = jax.tree.map(lambda a: a[::-1], params["blocks"])
  want = stack.apply({"params": params}, x, *extra)
  got = _loop(block, args, reversed_layers, x, extra, 3)
  assert float(jnp.abs(want - got).max()) > 1e-3


def test_attention_resolution():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert layers.resolve_attention("auto", bf16, "gpu") == "cudnn"
  assert layers.resolve_attention("auto", f32, "gpu") == "xla"
  assert layers.resolve_attention("auto", bf16, "tpu") == "flash"
  assert layers.resolve_attention("auto", bf16, "cpu") == "xla"
  assert layers.resolve_attention("xla", bf16, "gpu") == "xla"
  with pytest.raises(ValueError, match="config.model.attention='cudnn' needs a GPU"):
    layers.resolve_attention("cudnn", bf16, "cpu")
  with pytest.raises(ValueError, match="'flash' is the TPU Pallas kernel"):
    layers.resolve_attention("flash", bf16, "gpu")


def test_masked_attention_and_key_scale_run_xla_whatever_the_kernel():
  """A masked call (the MMLC's caption cross-attention) runs XLA's attention even when the
  model's kernel is a fused one, so it equals the XLA result exactly on any backend."""
  r = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(r[i], (2, 5, 4, 8)) for i in range(3))
  mask = jnp.arange(7)[None].repeat(2, 0) < jnp.array([[7], [3]])
  k7, v7 = (jax.random.normal(r[3], (2, 7, 4, 8)),) * 2
  want = layers.attention(q, k7, v7, mask=mask, implementation="xla")
  for impl in ("cudnn", "flash"):
    np.testing.assert_array_equal(layers.attention(q, k7, v7, mask=mask, implementation=impl),
                                  want)
  del k, v


def test_t5_config_default_dtype_is_float32():
  assert dataclasses.asdict(t5.T5Config.tiny())["dtype"] == "float32"


def _per_layer(tree):
  """The layout before ``nn.scan``: every stacked ``blocks`` / ``block`` dict split into
  ``blocks_<i>`` entries, inside dicts, tuples, namedtuples (optax states) and the train state."""
  if dataclasses.is_dataclass(tree):
    return tree.replace(**{f.name: _per_layer(getattr(tree, f.name))
                           for f in dataclasses.fields(tree)})
  if isinstance(tree, tuple):
    parts = [_per_layer(x) for x in tree]
    return type(tree)(*parts) if hasattr(tree, "_fields") else tuple(parts)
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key in ("blocks", "block") and isinstance(value, dict):
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"{key}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    else:
      out[key] = _per_layer(value)
  return out


def test_checkpoint_saved_before_the_layers_were_scanned_restores(tmp_path):
  """A train state saved by the checkpointer with per-layer keys (the layout before
  ``nn.scan``) restores into the stacked layout, for resuming (whole state) and for sampling
  (the EMA alone)."""
  from mmsr_jax.runtime import checkpoint as ckpt_lib
  from mmsr_jax.system import System
  from tests.conftest import perturbed, small_config
  system = System.from_config(small_config(), jax.devices()[:1])
  state = jax.jit(system.init_fn)(jax.random.key(3))
  state = state.replace(ema_params=perturbed(state.ema_params, 4, scale=0.1))
  old = jax.device_get(_per_layer(state))
  names = [ckpt_lib.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(old)]
  assert any(".blocks_1." in n for n in names) and not any(".blocks." in n for n in names)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save(5, old, force=True)
  ckpt.wait()
  assert ckpt_lib.is_per_layer(os.path.join(ckpt.step_dir(5), "state"))
  restored = ckpt.restore(5, system.abstract_state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ema = ckpt.restore_part(5, "ema_params", system.abstract_state.ema_params)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()
