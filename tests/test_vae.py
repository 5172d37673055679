"""KL VAE: shapes, diffusers parity, tiled encode/decode, autoencoder interface."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmsr_jax.weights import params_io
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models.vae import AutoencoderKL, VAEConfig
from mmsr_jax.diffusion import tiles
from mmsr_jax.weights import importers
from mmsr_jax.models import build


def _image(shape, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, shape).astype(np.float32)


def _vae_cfg(params: str = "") -> ml_collections.ConfigDict:
  """``config.autoencoder`` for the tiny VAE, with a non-trivial scale and shift."""
  from mmsr_jax.schema import sr
  tiny = VAEConfig.tiny()
  c = sr.sr_config().autoencoder
  c.update(dict(kind="vae", factor=tiny.downsample_factor, scaling_factor=0.5, shift_factor=0.1,
                params=params))
  c.arch.update(dict(block_out_channels=tuple(tiny.block_out_channels),
                     layers_per_block=tiny.layers_per_block,
                     latent_channels=tiny.latent_channels, norm_num_groups=tiny.norm_num_groups))
  return c


@pytest.fixture(scope="module")
def tiny_vae():
  """(autoencoder, config, module, variables, jitted encode, jitted decode); random init."""
  ae = build.autoencoder(_vae_cfg())
  cfg = ae.config
  model = AutoencoderKL(cfg)
  variables = {"params": ae.init_params(jax.random.key(0))}
  enc = jax.jit(lambda x: model.apply(variables, x, method="encode"))
  dec = jax.jit(lambda z: model.apply(variables, z, method="decode"))
  return ae, cfg, model, variables, enc, dec


def test_default_config_matches_sd_vae():
  cfg = VAEConfig()
  assert cfg.downsample_factor == 8
  shapes = importers.vae_param_shapes(cfg)["params"]
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert n == 83_653_863  # parameter count of the SD KL-f8 VAE
  assert shapes["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
  assert shapes["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)
  assert shapes["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 8)


def test_shapes(tiny_vae):
  _, cfg, _, _, enc, dec = tiny_vae
  f = cfg.downsample_factor
  x = _image((2, 32, 24, 3))
  mean, logvar = enc(x)
  assert mean.shape == logvar.shape == (2, 32 // f, 24 // f, cfg.latent_channels)
  y = dec(mean)
  assert y.shape == x.shape
  assert np.isfinite(np.asarray(y)).all()


def test_converter_rejects_wrong_state_dict():
  cfg = VAEConfig.tiny()
  with pytest.raises(ValueError, match="missing keys.*quant_conv"):
    importers.vae_params_from_torch_state_dict({}, cfg)
  sd = {"quant_conv.weight": np.zeros((4, 4, 1, 1), np.float32)}
  with pytest.raises(ValueError, match="quant_conv.weight"):
    importers.vae_params_from_torch_state_dict(sd, cfg)


def _diffusers_vae(randomise: bool):
  torch = pytest.importorskip("torch", reason="parity test needs torch")
  diffusers = pytest.importorskip("diffusers", reason="parity test needs diffusers")
  from tests.torch_random import randomise_
  cfg = VAEConfig.tiny()
  n = len(cfg.block_out_channels)
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
      scaling_factor=cfg.scaling_factor).float().eval()
  if randomise:
    kinds = randomise_(ref, seed=1)
    assert kinds["decoder.up_blocks.0.resnets.0.norm1.weight"] == "constant"  # was all ones
    assert kinds["encoder.mid_block.attentions.0.group_norm.bias"] == "constant"  # was zeros
  return ref, cfg


def _vae_outputs(ref, cfg, sd):
  """(ours, torch's) encoder mean / logvar and decoder output for the importer's params of
  ``sd``, on fixed inputs; with the largest error relative to the output scale."""
  import torch
  variables = importers.vae_params_from_torch_state_dict(sd, cfg)
  x = _image((2, 32, 32, 3), seed=3)
  z = _image((2, 8, 8, cfg.latent_channels), seed=4) * 2.0
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    want = (post.mean.permute(0, 2, 3, 1).numpy(), post.logvar.permute(0, 2, 3, 1).numpy(),
            ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
            .numpy())
  model = AutoencoderKL(cfg)
  with jax.default_matmul_precision("highest"):
    mean, logvar = model.apply(variables, x, method="encode")
    y = model.apply(variables, z, method="decode")
  return [float(np.abs(np.asarray(g) - w).max() / max(1.0, np.abs(w).max()))
          for g, w in zip((mean, logvar, y), want)]


def test_parity_with_diffusers(tmp_path):
  """Every tensor random (norm weights and biases too), read back from a safetensors file."""
  safetensors_torch = pytest.importorskip("safetensors.torch")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  ref, cfg = _diffusers_vae(randomise=True)
  path = str(tmp_path / "vae.safetensors")
  safetensors_torch.save_file(ref.state_dict(), path)
  errs = _vae_outputs(ref, cfg, safetensors_numpy.load_file(path))
  assert max(errs) <= 1e-4, errs


def test_parity_sees_swapped_norms():
  """An importer that swapped norm1 and norm2 of the resnets would pass a parity test with
  torch's default norms (all weights 1, biases 0); with random norms it fails by far more than
  the tolerance."""
  from tests.torch_random import state_dict_numpy, swapped

  def swap(sd):
    sd = swapped(sd, "norm1.weight", "norm2.weight")
    return swapped(sd, "norm1.bias", "norm2.bias")

  default, cfg = _diffusers_vae(randomise=False)
  assert max(_vae_outputs(default, cfg, swap(state_dict_numpy(default)))) <= 1e-4  # blind
  ref, cfg = _diffusers_vae(randomise=True)
  assert max(_vae_outputs(ref, cfg, state_dict_numpy(ref))) <= 1e-4
  errs = _vae_outputs(ref, cfg, swap(state_dict_numpy(ref)))
  assert min(errs) > 100 * 1e-4, errs


def test_tiled_blend_is_exact_for_a_local_map():
  """With a pointwise map (no context), the blend weights must reproduce it exactly."""
  z = jnp.asarray(_image((1, 21, 17, 3), seed=1))
  up = lambda t: jnp.repeat(jnp.repeat(t, 4, axis=1), 4, axis=2) * 2.0
  got = tiles.tiled_decode(up, z, factor=4, tile_latent=8, overlap_latent=3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(up(z)), atol=1e-6)

  x = jnp.asarray(_image((1, 84, 68, 3), seed=2))
  pool = lambda t: (t.reshape(1, t.shape[1] // 4, 4, t.shape[2] // 4, 4, 3).mean((2, 4)),
                    -t[:, ::4, ::4])
  got = tiles.tiled_encode(pool, x, factor=4, tile_latent=8, overlap_latent=2)
  for g, w in zip(got, pool(x)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)


def test_tiled_decode_one_tile_is_exact(tiny_vae):
  _, cfg, _, _, enc, dec = tiny_vae
  z = jnp.asarray(_image((1, 8, 6, cfg.latent_channels), seed=5))
  got = tiles.tiled_decode(dec, z, factor=cfg.downsample_factor, tile_latent=8,
                             overlap_latent=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(dec(z)))
  x = jnp.asarray(_image((1, 32, 32, 3), seed=6))
  got = tiles.tiled_encode(enc, x, factor=cfg.downsample_factor, tile_latent=8,
                             overlap_latent=2)
  for g, w in zip(got, enc(x)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_tiled_decode_multi_tile_is_close(tiny_vae):
  _, cfg, _, _, enc, dec = tiny_vae
  f = cfg.downsample_factor
  # A smooth latent, like a real image's: the encoding of a smooth image.
  yy, xx = np.meshgrid(np.linspace(-1, 1, 20 * f), np.linspace(-1, 1, 20 * f), indexing="ij")
  img = np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy], -1)[None].astype(np.float32)
  z, _ = enc(jnp.asarray(img))
  assert z.shape[1:3] == (20, 20)  # tile 8, overlap 2: 3 x 3 tiles
  full = np.asarray(dec(z))
  tiled = np.asarray(tiles.tiled_decode(dec, z, factor=f, tile_latent=8, overlap_latent=2))
  scale = np.abs(full).max()
  max_err = np.abs(tiled - full).max() / scale
  mean_err = np.abs(tiled - full).mean() / scale
  # Measured with this tiny random model (relative to max |output|; raised-cosine blend of
  # mmsr_jax.diffusion.tiles): max 1.00, mean 0.157. The error is spread over whole tiles, not concentrated at seams: each tile
  # has its own group-norm statistics and attention context, which a 20-latent-wide random
  # model with 8-latent tiles is very sensitive to. Blend correctness itself is checked
  # exactly by test_tiled_blend_is_exact_for_a_local_map.
  assert max_err < 1.5, max_err
  assert mean_err < 0.25, mean_err
  # No seam: across the blend ramps (latent columns/rows 6-8 and 12-14) neighbouring output
  # pixels differ no more than they do inside the tiles. Measured: ramps max 1.40 / 1.73 (x / y)
  # against interiors 1.87 / 2.58; a hard tile edge would put the largest jump on a ramp.
  zones = np.zeros(20 * f - 1, bool)
  for start in (6, 12):
    zones[start * f - 1:(start + 2) * f] = True
  for axis in (1, 2):
    jumps = np.abs(np.diff(tiled, axis=axis)).max(axis=tuple(a for a in range(4) if a != axis))
    assert jumps[zones].max() <= jumps[~zones].max(), (axis, jumps[zones].max(),
                                                      jumps[~zones].max())


def _interior_error(dec, z, f: int, tile: int, overlap: int) -> float:
  """Largest difference, relative to the output's largest value, between the tiled decode and
  each tile's own decode on the output pixels that only that tile covers (there the blend
  weight is exactly one, so the two must agree whatever the decoder's reach: group norm,
  attention). Tile origins are the latent ones; output positions are origin x ``f``."""
  tiled = np.asarray(tiles.tiled_decode(dec, z, factor=f, tile_latent=tile,
                                        overlap_latent=overlap))
  grid = tiles.TileGrid(tuple(z.shape[1:3]), tile, overlap)
  count = np.zeros(z.shape[1:3], int)
  for r, c in grid.origins:
    count[r:r + tile, c:c + tile] += 1
  err = 0.0
  for r, c in grid.origins:
    own = np.asarray(dec(z[:, r:r + tile, c:c + tile]))
    only = np.kron(count[r:r + tile, c:c + tile] == 1, np.ones((f, f), bool))
    assert only.any()
    got = tiled[:, r * f:(r + tile) * f, c * f:(c + tile) * f]
    err = max(err, float(np.abs(got - own)[:, only].max()))
  return err / float(np.abs(tiled).max())


def test_tiled_decode_interiors_equal_each_tiles_decode(tiny_vae, monkeypatch):
  """Tiled decode pastes every tile where it belongs: where one tile alone covers the output
  it equals that tile's decode to float rounding; a tile pasted one pixel off fails by far."""
  _, cfg, _, _, _, dec = tiny_vae
  f = cfg.downsample_factor
  z = jnp.asarray(_image((1, 21, 19, cfg.latent_channels), seed=8) * 2.0)  # 4 x 3 tiles
  assert _interior_error(dec, z, f, 8, 2) <= 1e-5

  real_scaled = tiles.TileGrid.scaled

  def one_row_one_pixel_low(self, k):
    g = real_scaled(self, k)
    rows = list(g.rows)
    rows[1] += 1
    return dataclasses.replace(g, starts=(tuple(rows), tuple(g.cols)))

  monkeypatch.setattr(tiles.TileGrid, "scaled", one_row_one_pixel_low)
  assert _interior_error(dec, z, f, 8, 2) > 0.05


def test_make_autoencoder_vae_round_trip(tmp_path, tiny_vae):
  ae, _, model, variables, enc, _ = tiny_vae
  assert isinstance(ae, ae_lib.KLAutoencoder)
  assert (ae.downsample, ae.latent_channels) == (4, 4)
  params = variables["params"]  # ae.init_params(key(0)): the random init
  x = jnp.asarray(_image((2, 16, 16, 3), seed=7))
  z = jax.jit(ae.encode)(params, x)
  assert z.shape == (2, 4, 4, 4)
  y = jax.jit(ae.decode)(params, z)
  assert y.shape == x.shape
  # encode = (mean - shift) * scale, and decode undoes that before the decoder.
  mean, _ = enc(x)
  np.testing.assert_allclose(np.asarray(z), (np.asarray(mean) - 0.1) * 0.5, rtol=1e-5,
                             atol=1e-5)
  raw = jax.jit(model.apply, static_argnames="method")(variables, mean, method="decode")
  np.testing.assert_allclose(np.asarray(y), np.asarray(raw), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(tiles.tiled_decode(
      lambda t: jax.jit(ae.decode)(params, t), z, factor=4, tile_latent=8, overlap_latent=2)),
      np.asarray(y))

  # Loading from a safetensors file gives those weights back.
  path = str(tmp_path / "ae.safetensors")
  params_io.save_params(path, variables["params"])
  loaded = params_io.load_params(path, build.autoencoder(_vae_cfg(path)).abstract_params())
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))


def test_config_checks_the_autoencoder_factor():
  from mmsr_jax.schema import sr
  config = sr.sr_config()
  config.autoencoder = _vae_cfg()
  sr.validate(config)
  config.autoencoder.factor = 8
  with pytest.raises(ValueError, match="config.autoencoder.factor=8"):
    sr.validate(config)
