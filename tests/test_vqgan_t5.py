"""Tests for the VQGAN tokenizer and the T5 encoder (shapes, VQ, torch parity).

Parity tests need torch + diffusers / transformers and are skipped without
them; everything else runs on JAX alone.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.models.t5 import T5Config, T5Encoder
from mmsr_jax.models.vqgan import VQGAN, VQGANConfig
from mmsr_jax.weights import importers


def _image(shape, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_vqgan():
  cfg = VQGANConfig.tiny()
  model = VQGAN(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), _image((1, 16, 16, 3)))
  return cfg, model, variables


# ------------------------------------------------------------------ VQGAN ---


def test_vqgan_shapes(tiny_vqgan):
  cfg, model, variables = tiny_vqgan
  x = _image((2, 16, 16, 3))
  z = model.apply(variables, x, method="encode")
  assert z.shape == (2, 4, 4, cfg.vq_embed_dim) and z.dtype == jnp.float32
  z_q, ids, aux = model.apply(variables, z, method="quantize")
  assert z_q.shape == z.shape and z_q.dtype == jnp.float32
  assert ids.shape == (2, 4, 4) and ids.dtype == jnp.int32
  assert set(aux) >= {"commitment_loss", "codebook_loss", "perplexity"}
  assert all(np.ndim(aux[k]) == 0 for k in aux)
  assert 1.0 <= float(aux["perplexity"]) <= cfg.num_vq_embeddings
  ids2 = model.apply(variables, x, method="encode_ids")
  np.testing.assert_array_equal(ids, ids2)
  y = model.apply(variables, ids2, method="decode_ids")
  assert y.shape == (2, 16, 16, 3) and y.dtype == jnp.float32
  recon, aux = model.apply(variables, x)
  assert recon.shape == x.shape
  np.testing.assert_allclose(recon, y, atol=1e-5)


@pytest.mark.parametrize("chans", [(16, 16), (16, 16, 32, 32)])
def test_vqgan_any_downsampling_factor(chans):
  cfg = dataclasses.replace(VQGANConfig.tiny(), block_out_channels=chans)
  model = VQGAN(cfg)
  f = cfg.downsample_factor
  x = jax.ShapeDtypeStruct((1, 4 * f, 4 * f, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  z = jax.eval_shape(
      lambda v, x: model.apply(v, x, method="encode"), variables, x)
  assert z.shape == (1, 4, 4, cfg.vq_embed_dim)
  recon, _ = jax.eval_shape(model.apply, variables, x)
  assert recon.shape == x.shape


def test_vqgan_default_config_shapes():
  cfg = VQGANConfig()
  assert cfg.downsample_factor == 16
  shapes = importers.vqgan_param_shapes(cfg)["params"]
  assert shapes["quantize"]["embedding"]["embedding"].shape == (1024, 256)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  ids = jax.eval_shape(
      lambda v, x: VQGAN(cfg).apply(v, x, method="encode_ids"),
      {"params": shapes}, x)
  assert ids.shape == (1, 16, 16)


def test_vqgan_straight_through_gradient(tiny_vqgan):
  _, model, variables = tiny_vqgan
  x = _image((2, 16, 16, 3), seed=1)

  def loss_fn(params):
    def f(m, x):
      z_q, _, _ = m.quantize(m.encode(x))
      return jnp.sum(jnp.square(z_q))
    return model.apply({"params": params}, x, method=f)

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  enc = jax.tree.leaves(grads["encoder"])
  assert sum(float(jnp.sum(jnp.abs(g))) for g in enc) > 0
  # The codebook receives no gradient through the straight-through path.
  assert float(jnp.abs(grads["quantize"]["embedding"]["embedding"]).max()) == 0


def test_quantize_picks_nearest_code(tiny_vqgan):
  cfg, model, variables = tiny_vqgan
  params = variables["params"]
  codebook = np.asarray(params["quantize"]["embedding"]["embedding"])
  rs = np.random.RandomState(3)
  # Points near random codes plus noise, and far-away points.
  near = codebook[rs.randint(0, cfg.num_vq_embeddings, 40)]
  near = near + 0.3 * codebook.std() * rs.randn(*near.shape)
  far = rs.randn(24, cfg.vq_embed_dim)
  z = np.concatenate([near, far]).astype(np.float32).reshape(2, 8, 4, -1)
  z_q, ids, aux = model.apply(variables, z, method="quantize")
  d = ((z.reshape(-1, 1, cfg.vq_embed_dim).astype(np.float64)
        - codebook[None].astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1), d.argmin(-1))
  np.testing.assert_allclose(z_q, codebook[np.asarray(ids)], atol=1e-6)
  mse = np.mean((codebook[np.asarray(ids)] - z) ** 2)
  np.testing.assert_allclose(aux["commitment_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-5)


def _to_torch_layout(variables) -> dict[str, np.ndarray]:
  """Inverse of the converter: Flax variables -> diffusers-style state dict."""
  sd = {}
  for path, v in flax.traverse_util.flatten_dict(variables["params"]).items():
    v = np.asarray(v)
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    sd[importers._flax_path_to_torch_key(path)] = v
  return sd


def test_vqgan_converter_round_trip_and_errors(tiny_vqgan):
  cfg, _, variables = tiny_vqgan
  sd = _to_torch_layout(variables)
  assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in sd
  assert "encoder.mid_block.attentions.0.to_out.0.weight" in sd
  assert "quantize.embedding.weight" in sd
  back = importers.vqgan_params_from_torch_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))

  key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
  bad = dict(sd, **{key: np.zeros((32, 64, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*"
                     r"\(32, 64, 3, 3\).*\(1, 1, 64, 32\)"):
    importers.vqgan_params_from_torch_state_dict(bad, cfg)
  missing = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(ValueError, match="missing keys.*conv_shortcut"):
    importers.vqgan_params_from_torch_state_dict(missing, cfg)
  extra = dict(sd, **{"encoder.foo.weight": np.zeros(3)})
  with pytest.raises(ValueError, match="unexpected keys.*encoder.foo.weight"):
    importers.vqgan_params_from_torch_state_dict(extra, cfg)


# --------------------------------------------------------------------- T5 ---


def _ids_and_mask(cfg: T5Config, b=2, length=12, pad_from=7, seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(1, cfg.vocab_size, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  mask[1, pad_from:] = 0
  ids[1, pad_from:] = 0
  return ids, mask


@pytest.mark.parametrize("ffp", ["gated-gelu", "relu"])
def test_t5_shapes_and_padding(ffp):
  cfg = dataclasses.replace(T5Config.tiny(), feed_forward_proj=ffp)
  model = T5Encoder(cfg)
  ids, mask = _ids_and_mask(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), ids, mask)
  p = variables["params"]
  assert p["shared"]["embedding"].shape == (259, 64)
  # One position-bias table beside the scanned stack of layers (leading layer axis).
  assert p["relative_attention_bias"]["embedding"].shape == (32, 4)
  attn = p["block"]["layer_0"]["SelfAttention"]
  assert "relative_attention_bias" not in attn
  assert attn["q"]["kernel"].shape == (cfg.num_layers, 64, cfg.num_heads * cfg.d_kv)
  ff = p["block"]["layer_1"]["DenseReluDense"]
  assert set(ff) == ({"wi_0", "wi_1", "wo"} if ffp.startswith("gated")
                     else {"wi", "wo"})
  apply = jax.jit(model.apply)
  out = apply(variables, ids, mask)
  assert out.shape == (2, 12, 64) and out.dtype == jnp.float32
  # Padded keys are ignored: changing their ids leaves real tokens unchanged.
  ids2 = ids.copy()
  ids2[1, 7:] = 5
  out2 = apply(variables, ids2, mask)
  np.testing.assert_allclose(out2[1, :7], out[1, :7], atol=1e-5)
  np.testing.assert_allclose(out2[0], out[0], atol=1e-6)


def test_t5_bfloat16_runs():
  cfg = dataclasses.replace(T5Config.tiny(), dtype="bfloat16")
  ids, mask = _ids_and_mask(cfg)
  variables = jax.jit(T5Encoder(cfg).init)(jax.random.key(0), ids, mask)
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  out = T5Encoder(cfg).apply(variables, ids, mask)
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())


def test_t5_relative_position_buckets():
  b = t5_lib.relative_position_buckets(5, 5, 32, 128)
  # Keys after the query use the upper half of the buckets.
  np.testing.assert_array_equal(b[0], [0, 17, 18, 19, 20])
  np.testing.assert_array_equal(b[4], [4, 3, 2, 1, 0])
  far = t5_lib.relative_position_buckets(1, 1000, 32, 128)
  assert far.max() == 31 and far.min() == 0


def test_t5_converter_errors():
  cfg = T5Config.tiny()
  shapes = importers.t5_param_shapes(cfg)["params"]
  sd = {}
  for path, s in flax.traverse_util.flatten_dict(shapes).items():
    per_layer = [(path, s.shape)]
    if path[0] == "block":  # the scanned stack: one torch key per layer
      per_layer = [((f"block_{i}",) + path[1:], s.shape[1:]) for i in range(s.shape[0])]
    for p_i, shape in per_layer:
      shape = shape[::-1] if p_i[-1] == "kernel" else shape
      sd[importers._t5_torch_key(p_i)] = np.zeros(shape, np.float32)
  importers.t5_params_from_torch_state_dict(sd, cfg)
  # Decoder keys of a full checkpoint are skipped; the tied alias is accepted.
  full = dict(sd, **{"decoder.block.0.layer.0.SelfAttention.q.weight":
                     np.zeros((64, 64)),
                     "encoder.embed_tokens.weight": sd["shared.weight"]})
  importers.t5_params_from_torch_state_dict(full, cfg)
  key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  with pytest.raises(ValueError, match=key.replace(".", r"\.") +
                     r".*\(128, 32\).*\(64, 128\)"):
    importers.t5_params_from_torch_state_dict(
        dict(sd, **{key: np.zeros((128, 32))}), cfg)
  with pytest.raises(ValueError, match="missing keys.*final_layer_norm"):
    importers.t5_params_from_torch_state_dict(
        {k: v for k, v in sd.items() if "final" not in k}, cfg)


# ----------------------------------------------------------------- parity ---


def _diffusers_vqgan(randomise: bool):
  torch = pytest.importorskip("torch", reason="parity test needs torch")
  diffusers = pytest.importorskip("diffusers", reason="needs diffusers")
  from tests.torch_random import randomise_
  cfg = VQGANConfig.tiny()
  n = len(cfg.block_out_channels)
  torch.manual_seed(0)
  ref = diffusers.VQModel(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels,
      layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels,
      num_vq_embeddings=cfg.num_vq_embeddings, vq_embed_dim=cfg.vq_embed_dim,
      norm_num_groups=cfg.norm_num_groups,
      mid_block_add_attention=cfg.mid_block_attention,
  ).float().eval()
  if randomise:
    kinds = randomise_(ref, seed=2)
    assert kinds["decoder.up_blocks.0.resnets.0.norm2.weight"] == "constant"  # was all ones
    assert kinds["quantize.embedding.weight"] == "random"  # the codebook, redrawn
  return ref, cfg


def _vqgan_errors(ref, cfg, sd):
  """(share of token ids that differ, latent error, output error) of our VQGAN with the
  importer's params of ``sd`` against the torch model (errors relative to the output scale)."""
  import torch
  variables = importers.vqgan_params_from_torch_state_dict(sd, cfg)
  x = _image((2, 32, 32, 3), seed=5)
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    z_ref = ref.encode(xt).latents
    _, _, (_, _, ids_ref) = ref.quantize(z_ref)
    y_ref = ref(xt).sample.permute(0, 2, 3, 1).numpy()
  z_ref = z_ref.permute(0, 2, 3, 1).numpy()
  model = VQGAN(cfg)

  @jax.jit
  def run(variables, x):
    z = model.apply(variables, x, method="encode")
    y, aux = model.apply(variables, x)
    return z, y, aux

  with jax.default_matmul_precision("highest"):
    z, y, aux = run(variables, x)
  ids_differ = float(np.mean(np.asarray(aux["ids"]).reshape(-1) != ids_ref.numpy().reshape(-1)))
  rel = lambda got, want: float(np.abs(np.asarray(got) - want).max() / max(1.0, np.abs(want).max()))
  return ids_differ, rel(z, z_ref), rel(y, y_ref)


def test_vqgan_parity_with_diffusers(tmp_path):
  """Every tensor random (norms, biases, the codebook), read back from a safetensors file."""
  safetensors_torch = pytest.importorskip("safetensors.torch")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  ref, cfg = _diffusers_vqgan(randomise=True)
  path = str(tmp_path / "vq.safetensors")
  safetensors_torch.save_file(ref.state_dict(), path)
  ids_differ, z_err, y_err = _vqgan_errors(ref, cfg, safetensors_numpy.load_file(path))
  assert ids_differ == 0.0 and z_err <= 1e-4 and y_err <= 1e-4, (ids_differ, z_err, y_err)


def test_vqgan_parity_sees_swapped_norms():
  """Swapping each resnet's norm1 / norm2 goes unseen with torch's default norms; with random
  ones the outputs differ by far more than the parity tolerance."""
  from tests.torch_random import state_dict_numpy, swapped

  def swap(sd):
    return swapped(swapped(sd, "norm1.weight", "norm2.weight"), "norm1.bias", "norm2.bias")

  default, cfg = _diffusers_vqgan(randomise=False)
  _, z_err, y_err = _vqgan_errors(default, cfg, swap(state_dict_numpy(default)))
  assert max(z_err, y_err) <= 1e-4  # blind
  ref, cfg = _diffusers_vqgan(randomise=True)
  _, z_err, y_err = _vqgan_errors(ref, cfg, swap(state_dict_numpy(ref)))
  assert min(z_err, y_err) > 100 * 1e-4, (z_err, y_err)


@pytest.mark.parametrize("ffp", ["gated-gelu", "relu"])
def test_t5_parity_with_transformers(tmp_path, ffp):
  """Every tensor random (layer norms, the embedding, the position-bias table)."""
  safetensors_torch = pytest.importorskip("safetensors.torch")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")

  ref, cfg = _transformers_t5(ffp, randomise=True)
  path = str(tmp_path / "t5.safetensors")
  safetensors_torch.save_model(ref, path)  # drops one name of the tied pair
  err = _t5_error(ref, cfg, safetensors_numpy.load_file(path))
  assert err <= 1e-4, err


def _transformers_t5(ffp: str, randomise: bool):
  torch = pytest.importorskip("torch", reason="parity test needs torch")
  transformers = pytest.importorskip("transformers")
  from tests.torch_random import randomise_
  cfg = dataclasses.replace(T5Config.tiny(), feed_forward_proj=ffp)
  torch.manual_seed(0)
  ref = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
      d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj=ffp,
      dropout_rate=0.0)).float().eval()
  if randomise:
    kinds = randomise_(ref, seed=3)
    assert kinds["encoder.final_layer_norm.weight"] == "constant"  # was all ones
    assert kinds["encoder.block.0.layer.1.layer_norm.weight"] == "constant"
  return ref, cfg


def _t5_error(ref, cfg, sd) -> float:
  """Largest error of our T5 with the importer's params of ``sd`` against the torch model,
  relative to the output scale, on a padded batch longer than max_distance (so the log-spaced
  position buckets are exercised)."""
  import torch
  variables = importers.t5_params_from_torch_state_dict(sd, cfg)
  ids, mask = _ids_and_mask(cfg, b=2, length=150, pad_from=60, seed=1)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(T5Encoder(cfg).apply(variables, ids, mask))
  return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def test_t5_parity_sees_swapped_layer_norms():
  """Swapping each block's attention and feed-forward layer norms goes unseen with torch's
  default weights (all ones); with random ones the output is far off."""
  from tests.torch_random import state_dict_numpy, swapped

  def swap(sd):
    return swapped(sd, "layer.0.layer_norm.weight", "layer.1.layer_norm.weight")

  default, cfg = _transformers_t5("gated-gelu", randomise=False)
  assert _t5_error(default, cfg, swap(state_dict_numpy(default))) <= 1e-4  # blind
  ref, cfg = _transformers_t5("gated-gelu", randomise=True)
  assert _t5_error(ref, cfg, swap(state_dict_numpy(ref))) > 100 * 1e-4


def test_t5_buckets_match_transformers():
  torch = pytest.importorskip("torch", reason="parity test needs torch")
  pytest.importorskip("transformers")
  from transformers.models.t5.modeling_t5 import T5Attention
  for num_buckets, max_distance in [(32, 128), (32, 64), (64, 256)]:
    length = 600
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    got = t5_lib.relative_position_buckets(length, length, num_buckets,
                                           max_distance)
    np.testing.assert_array_equal(got, want)
