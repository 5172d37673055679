"""Shapes, dtypes and the conditioning mechanics of the MMSR modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.models import autoencoder, context, dit, layers
from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.models import build
from mmsr_jax.system import dummy_inputs, frozen_params
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.formats.records import MODALITIES


def test_pixel_autoencoder_is_exact_and_shaped():
  ae = autoencoder.PixelAutoencoder(factor=4)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3), minval=-1, maxval=1)
  z = ae.encode({}, x)
  assert z.shape == (2, 8, 12, 48) and ae.latent_channels == 48 and ae.downsample == 4
  # A latent pixel holds exactly its 4x4 image patch.
  np.testing.assert_array_equal(np.asarray(z[1, 2, 3]).reshape(4, 4, 3), x[1, 8:12, 12:16])
  np.testing.assert_array_equal(ae.decode({}, z), x)
  with pytest.raises(ValueError, match="not divisible"):
    ae.encode({}, x[:, :30])


def test_sincos_2d_matches_formula():
  emb = layers.sincos_2d(8, 2, 3)
  assert emb.shape == (6, 8)
  # Token (row 1, col 2): first half encodes the column, second half the row.
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  np.testing.assert_allclose(emb[5, :4], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]),
                             rtol=1e-6)
  np.testing.assert_allclose(emb[5, 4:], np.concatenate([np.sin(omega), np.cos(omega)]), rtol=1e-6)


def test_dit_shapes_dtypes_and_zero_init_output():
  model = dit.DiT(out_channels=5, width=32, depth=2, num_heads=4, patch_size=2, pos_base_size=4)
  x = jnp.ones((3, 8, 8, 10))
  ctx = jnp.ones((3, 7, 32))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.array([0, 10, 999]), ctx)
  out = model.apply(params, x, jnp.array([0, 10, 999]), ctx)
  assert out.shape == (3, 8, 8, 5) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # proj_out is zero-initialised (DiT/PixArt practice)
  bf16 = dit.DiT(out_channels=5, width=32, depth=2, num_heads=4, dtype=jnp.bfloat16)
  out16 = bf16.apply(params, x, jnp.array([0, 10, 999]), ctx)
  assert out16.dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  with pytest.raises(ValueError, match="patch_size"):
    model.apply(params, jnp.ones((1, 7, 8, 10)), jnp.array([0]), ctx[:1])


def _context_module(**kw):
  return context.MultimodalContext(width=32, codebook_size=16, token_grid=(2, 2), num_latents=4,
                                   depth=1, num_heads=4, **kw)


def _context_inputs(seed=0, b=2):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, 5, 12)), jnp.ones((b, 5), jnp.int32),
          jax.random.randint(k[1], (b, 3, 2, 2), 0, 16), jnp.ones((b, 3), bool))


def test_context_shapes_and_params():
  mod = _context_module()
  inputs = _context_inputs()
  params = jax.jit(mod.init)(jax.random.key(0), *inputs)
  out = mod.apply(params, *inputs)
  assert out.shape == (2, 4, 32) and out.dtype == jnp.float32
  p = params["params"]
  for name in MODALITIES:
    assert p[f"{name}_null"].value.shape == (4, 32)  # one null vector per token position
    assert p[f"{name}_embed"]["embedding"].value.shape == (16, 32)
  assert p["latents"].value.shape == (4, 32)


def test_latent_positions_tie_each_latent_to_its_place_on_the_map_grid(config):
  from mmsr_jax.models.context import latent_grid_positions
  from mmsr_jax.models.layers import sincos_2d
  # 4 latents on a 4x4 map grid: latent (0, 0) sits at map position (0.5, 0.5), between the
  # tokens of its 2x2 cell; nearest map token by embedding similarity lies in that cell.
  lat = latent_grid_positions(32, 4, 4, 4)
  grid = sincos_2d(32, 4, 4)
  nearest = np.argmax(lat @ grid.T, axis=1)
  cells = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
  for k in range(4):
    assert nearest[k] in cells[k]
  # The module adds them (and only when asked); the output changes, shapes do not.
  inputs = _context_inputs()
  free, placed = _context_module(), _context_module(latent_positions=True)
  params = jax.jit(free.init)(jax.random.key(0), *inputs)
  a, b = free.apply(params, *inputs), placed.apply(params, *inputs)
  assert a.shape == b.shape and np.abs(np.asarray(a - b)).max() > 1e-3
  with pytest.raises(ValueError, match="square number of latents"):
    latent_grid_positions(32, 8, 4, 4)
  config.model.context_latent_positions = True
  config.model.context_latents = 8
  with pytest.raises(ValueError, match="config.model.context_latents=8: expected a square"):
    sr_schema.validate(config)
  config.model.context_latents = 4
  sr_schema.validate(config)


def _randomised(params, seed=1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


def test_spatial_path_keeps_each_place_in_its_own_denoiser_token(config):
  # 4x4 map tokens pooled onto a 2x2 denoiser grid: the context grows by 4 rows, silent at init.
  mod = context.MultimodalContext(width=32, codebook_size=16, token_grid=(4, 4), num_latents=4,
                                  depth=1, num_heads=4, spatial_grid=2)
  text, mask, _, present = _context_inputs()
  ids = jax.random.randint(jax.random.key(3), (2, 3, 4, 4), 0, 16)
  params = jax.jit(mod.init)(jax.random.key(0), text, mask, ids, present)
  out = mod.apply(params, text, mask, ids, present)
  assert out.shape == (2, 4 + 4, 32)
  np.testing.assert_array_equal(out[:, 4:], 0.0)
  params = _randomised(params)
  # An edge id changed at map place (1, 2) moves denoiser cell (0, 1) = row 1 of the path only.
  moved = ids.at[:, 2, 1, 2].set((ids[:, 2, 1, 2] + 1) % 16)
  a = np.asarray(mod.apply(params, text, mask, ids, present))
  b = np.asarray(mod.apply(params, text, mask, moved, present))
  change = np.abs(a - b).max(axis=(0, 2))
  assert change[4 + 1] > 1e-3
  np.testing.assert_array_equal(change[[4, 6, 7]], 0.0)
  # The DiT adds the path to its patch tokens: the MMSR built from the config uses it.
  config.model.context_spatial = True
  sr_schema.validate(config)
  model = build.mmsr(config)
  cond = build.conditioner(config)
  inputs = dummy_inputs(config, cond, batch=2)
  mparams = _randomised(jax.jit(model.init)(jax.random.key(0), *inputs))
  ctx = model.apply(mparams, *inputs[3:], method=MMSR.encode_context)
  grid = config.data.hr_size // config.autoencoder.factor // config.model.patch_size
  assert ctx.shape == (2, config.model.context_latents + grid ** 2, config.model.width)
  den = lambda c: model.apply(mparams, *inputs[:3], c, method=MMSR.denoise)  # noqa: E731
  kick = jax.random.normal(jax.random.key(5), ctx.shape[-1:])  # not a constant: LN removes one
  assert np.abs(np.asarray(den(ctx) - den(ctx.at[:, -1].add(kick)))).max() > 1e-2
  config.data.map_size = 24  # 6x6 map tokens onto the 4x4 DiT grid
  with pytest.raises(ValueError, match="config.model.context_spatial=True: expected False"):
    sr_schema.validate(config)


def test_null_block_used_exactly_when_modality_missing():
  mod = _context_module()
  text, mask, ids, present = _context_inputs()
  params = jax.jit(mod.init)(jax.random.key(0), text, mask, ids, present)
  other_ids = (ids + 5) % 16
  # depth absent for example 0: its depth ids no longer matter; example 1 (present) changes.
  present = present.at[0, 0].set(False)
  a = mod.apply(params, text, mask, ids, present)
  depth_changed = other_ids.at[:, 1:].set(ids[:, 1:])
  b = mod.apply(params, text, mask, depth_changed, present)
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4
  # Absent == the null block: zeroing the null parameter changes exactly the absent example.
  p2 = jax.tree.map(lambda x: x, params)
  p2["params"]["depth_null"] = p2["params"]["depth_null"].replace_boxed(
      jnp.zeros((4, 32)))
  c = mod.apply(p2, text, mask, ids, present)
  assert np.abs(np.asarray(a[0] - c[0])).max() > 1e-4
  np.testing.assert_array_equal(a[1], c[1])


def test_temperature_one_is_identity_exactly():
  mod = _context_module()
  inputs = _context_inputs()
  params = jax.jit(mod.init)(jax.random.key(0), *inputs)
  ref = mod.apply(params, *inputs)
  ones = mod.apply(params, *inputs, jnp.ones((2, 4)))
  np.testing.assert_array_equal(ref, ones)
  hot = mod.apply(params, *inputs, jnp.asarray([[1.0, 0.5, 1.0, 2.0]] * 2))
  assert np.abs(np.asarray(hot - ref)).max() > 1e-5


def test_low_temperature_moves_attention_mass_to_that_modality():
  """K* = K / delta on one block: with positive logits toward it, delta < 1 raises its share."""
  rng = np.random.default_rng(0)
  d, n_other, n_mod = 16, 12, 6
  base = rng.normal(size=(1, 1, 1, d))
  q = (base + 0.2 * rng.normal(size=(1, 3, 1, d))).astype(np.float32)  # queries share a direction
  k_other = rng.normal(size=(1, n_other, 1, d)).astype(np.float32) * 0.3
  k_mod = (base * 0.5 + 0.05 * rng.normal(size=(1, n_mod, 1, d))).astype(np.float32)
  k = np.concatenate([k_other, k_mod], axis=1)
  # Values: 0 for other tokens, 1 for the modality -> the output is the attention mass on it.
  v = np.concatenate([np.zeros((1, n_other, 1, d)), np.ones((1, n_mod, 1, d))], 1).astype(np.float32)
  def mass(delta):
    scale = np.concatenate([np.ones(n_other), np.full(n_mod, 1.0 / delta)])[None].astype(np.float32)
    return np.asarray(layers.attention(q, k, v, key_scale=jnp.asarray(scale)))[0, :, 0, 0]
  m1, m_half, m_two = mass(1.0), mass(0.5), mass(2.0)
  assert np.all(m_half > m1 + 0.05) and np.all(m_two < m1 - 0.05)


def test_mmsr_shapes_from_config(config):
  model = build.mmsr(config)
  cond = build.conditioner(config)
  inputs = dummy_inputs(config, cond, batch=2)
  params = jax.jit(model.init)(jax.random.key(0), *inputs)
  out = model.apply(params, *inputs)
  assert out.shape == inputs[0].shape == (2, 8, 8, 48)
  ctx = model.apply(params, *inputs[3:], method=MMSR.encode_context)
  assert ctx.shape == (2, config.model.context_latents, config.model.width)
  frozen = frozen_params(config, cond)
  maps = jnp.zeros((2, 3, config.data.map_size, config.data.map_size, 3))
  ids = cond.modality_ids(frozen, maps)
  assert ids.shape == (2, 3, 4, 4) and ids.dtype == jnp.int32
  states = cond.text_states(frozen, jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32))
  assert states.shape == (2, 16, config.text.encoder.d_model)
  # Every parameter carries logical axis names for the sharding rules.
  boxed = jax.tree.leaves(params["params"], is_leaf=lambda x: hasattr(x, "names"))
  assert all(hasattr(b, "names") for b in boxed)


def test_bad_sizes_are_named(config):
  config.data.hr_size = 36  # 9px latent, patch 2
  with pytest.raises(ValueError, match="config.data.hr_size=36"):
    sr_schema.validate(config)


@pytest.mark.parametrize("residual", [False, True])
def test_diffusion_target_round_trips(config, residual):
  config.diffusion.residual = residual
  config.diffusion.residual_scale = 4.0
  cond = build.conditioner(config)
  frozen = frozen_params(config, cond)
  k = jax.random.split(jax.random.key(1))
  hr = jax.random.uniform(k[0], (2, 32, 32, 3), minval=-1, maxval=1)
  lr = jax.random.uniform(k[1], (2, 8, 8, 3), minval=-1, maxval=1)
  lr_lat = cond.lr_latent(frozen, lr, (32, 32))
  x0 = cond.diffusion_target(frozen, hr, lr_lat)
  np.testing.assert_allclose(cond.decode_sample(frozen, x0, lr_lat), hr, atol=1e-6)
  if residual:  # an HR equal to the upsampled LR is the zero residual
    up = autoencoder.upsample_bicubic(lr, 32, 32)
    np.testing.assert_allclose(cond.diffusion_target(frozen, up, lr_lat), 0.0, atol=1e-6)
    np.testing.assert_allclose(x0, 4.0 * (cond.encode_image(frozen, hr) - lr_lat), atol=1e-6)


def test_encode_passes_give_the_same_conditions_one_pass_at_a_time(config):
  """``config.encode_passes`` splits the frozen encoders' work over the batch into sequential
  passes (to bound a TPU chip's peak): the conditions and the target must not change, and the
  encoders must really run inside the loop."""
  config.autoencoder.kind = "vae"
  config.autoencoder.factor = 2
  config.autoencoder.arch = dict(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=4)
  k = jax.random.split(jax.random.key(3), 5)
  b, m = 6, config.data.map_size
  batch = {"lr": jax.random.uniform(k[0], (b, 8, 8, 3), minval=-1, maxval=1),
           "hr": jax.random.uniform(k[1], (b, 32, 32, 3), minval=-1, maxval=1),
           "text_ids": jnp.ones((b, 16), jnp.int32), "text_mask": jnp.ones((b, 16), jnp.int32)}
  for i, name in enumerate(MODALITIES):
    batch[name] = jax.random.uniform(k[2 + i], (b, m, m, 3), minval=-1, maxval=1)
  results = {}
  for passes in (1, 3, 4):  # 4 does not divide 6: gcd(6, 4) = 2 passes
    config.encode_passes = passes
    cond = build.conditioner(config)
    frozen = frozen_params(config, cond)
    out = jax.jit(cond.__call__)(frozen, batch)
    out["target"] = jax.jit(cond.batch_target)(frozen, batch, out["lr_latent"])
    results[passes] = out
    jaxpr = str(jax.make_jaxpr(cond.__call__)(frozen, batch))
    scans = jaxpr.count(f"length={passes if passes == 3 else 2}")
    if passes == 1:
      baseline = {3: jaxpr.count("length=3"), 4: jaxpr.count("length=2")}
    else:  # one loop per encoder run in passes: the VAE and the VQ
      assert scans == baseline[passes] + 2, jaxpr
  for passes in (3, 4):
    for key in ("lr_latent", "ids", "target", "text_states"):
      np.testing.assert_allclose(results[passes][key], results[1][key], atol=1e-5, err_msg=key)
