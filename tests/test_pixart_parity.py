"""Parity of our DiT with diffusers ``PixArtTransformer2DModel`` and the weight importer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.models.dit import DiT
from tests.torch_random import randomise_
from mmsr_jax.weights.pixart import (
  CaptionProjection,
  pixart_params_from_torch_state_dict,
  widen_patch_embed,
)

torch = pytest.importorskip("torch", reason="PixArt parity tests need torch")
diffusers = pytest.importorskip("diffusers", reason="PixArt parity tests need diffusers")

HEADS, HEAD_DIM, DEPTH, PATCH, IN_CH = 4, 8, 2, 2, 4
WIDTH = HEADS * HEAD_DIM


def _torch_model(out_channels: int, seed: int = 0, interpolation_scale: float | None = None):
  """A tiny random PixArt transformer (fp32, eval) with non-trivial modulation weights."""
  torch.manual_seed(seed)
  model = diffusers.PixArtTransformer2DModel(
      sample_size=8, patch_size=PATCH, in_channels=IN_CH, out_channels=out_channels,
      num_layers=DEPTH, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
      cross_attention_dim=WIDTH, caption_channels=16, norm_type="ada_norm_single",
      use_additional_conditions=False,
      interpolation_scale=interpolation_scale).float().eval()
  # Every tensor random, norms and biases included (the one helper of every parity test); the
  # sin-cos position table is a non-persistent buffer both sides compute, so it is not touched.
  kinds = randomise_(model, seed=seed)
  assert "pos_embed.pos_embed" not in model.state_dict()
  assert set(kinds) == set(model.state_dict())  # every saved tensor
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(size: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, IN_CH, size, size)).astype(np.float32)  # NCHW
  t = np.array([3.0, 871.0], np.float32)
  text = rng.standard_normal((2, 5, 16)).astype(np.float32)
  return x, t, text


def _ours(dit_vars, cap_vars, out_channels, x, t, text, pos_base_size=None, mask=None,
          pos_interpolation_scale=1.0):
  context = CaptionProjection(WIDTH).apply(cap_vars, jnp.asarray(text))
  dit = DiT(out_channels=out_channels, width=WIDTH, depth=DEPTH, num_heads=HEADS,
            patch_size=PATCH, pos_base_size=pos_base_size,
            pos_interpolation_scale=pos_interpolation_scale)
  out = dit.apply(dit_vars, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), context,
                  None if mask is None else jnp.asarray(mask))
  return np.asarray(out).transpose(0, 3, 1, 2)  # NHWC -> NCHW


def _theirs(model, x, t, text, mask=None):
  with torch.no_grad():
    return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                 timestep=torch.from_numpy(t),
                 encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
                 return_dict=False)[0].numpy()


def _assert_close(ours, theirs):
  err = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  assert err <= 1e-4 * scale, f"max abs diff {err:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize("out_channels", [IN_CH, 2 * IN_CH])  # plain / learned sigma
def test_parity_with_diffusers(out_channels):
  model = _torch_model(out_channels)
  dit_vars, cap_vars = pixart_params_from_torch_state_dict(_state_dict(model), depth=DEPTH)
  x, t, text = _inputs(8)
  ours, theirs = _ours(dit_vars, cap_vars, out_channels, x, t, text), _theirs(model, x, t, text)
  assert ours.shape == theirs.shape == (2, out_channels, 8, 8)
  _assert_close(ours, theirs)
  if out_channels == 2 * IN_CH:  # eps and variance halves separately
    _assert_close(ours[:, :IN_CH], theirs[:, :IN_CH])
    _assert_close(ours[:, IN_CH:], theirs[:, IN_CH:])


def test_parity_larger_grid_and_text_mask():
  """A grid twice the training size (interpolated positions) and a padded caption."""
  model = _torch_model(IN_CH, seed=2)
  dit_vars, cap_vars = pixart_params_from_torch_state_dict(_state_dict(model), depth=DEPTH)
  x, t, text = _inputs(16, seed=3)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  base = 8 // PATCH  # diffusers' base_size = sample_size // patch_size
  ours = _ours(dit_vars, cap_vars, IN_CH, x, t, text, pos_base_size=base, mask=mask.astype(bool))
  _assert_close(ours, _theirs(model, x, t, text, mask=mask))


@pytest.mark.parametrize("size", [8, 16])  # the training grid, and twice it (interpolated)
def test_parity_with_a_non_default_interpolation_scale(size):
  """PixArt-Sigma 1024 uses interpolation_scale = 2 (``config.model.pos_interpolation_scale``
  after conversion): our DiT given that scale computes what diffusers' transformer built with it
  computes, every tensor random; the default scale would not."""
  scale = 2.0
  model = _torch_model(IN_CH, seed=4, interpolation_scale=scale)
  assert model.pos_embed.interpolation_scale == scale
  dit_vars, cap_vars = pixart_params_from_torch_state_dict(_state_dict(model), depth=DEPTH)
  x, t, text = _inputs(size, seed=5)
  base = 8 // PATCH  # diffusers' base_size = sample_size // patch_size
  theirs = _theirs(model, x, t, text)
  _assert_close(_ours(dit_vars, cap_vars, IN_CH, x, t, text, pos_base_size=base,
                      pos_interpolation_scale=scale), theirs)
  # The comparison can see the scale: the default one gives another output.
  unscaled = _ours(dit_vars, cap_vars, IN_CH, x, t, text, pos_base_size=base)
  assert float(np.max(np.abs(unscaled - theirs))) > 1e-2 * max(1.0, float(np.max(np.abs(theirs))))


@pytest.mark.parametrize("grid,base,scale", [((6, 10), 4, 2.0), ((16, 16), 8, 0.5)])
def test_position_table_matches_diffusers(grid, base, scale):
  """The sin-cos table against diffusers' ``get_2d_sincos_pos_embed`` with a non-default
  ``interpolation_scale``, a non-square grid included (rows, columns)."""
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  from mmsr_jax.models.layers import sincos_2d
  theirs = np.asarray(get_2d_sincos_pos_embed(WIDTH, grid, base_size=base,
                                              interpolation_scale=scale, output_type="pt"))
  ours = sincos_2d(WIDTH, grid[0], grid[1], base, scale)
  assert ours.shape == theirs.shape == (grid[0] * grid[1], WIDTH)
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_widened_patch_embed_ignores_extra_channels():
  model = _torch_model(IN_CH)
  dit_vars, cap_vars = pixart_params_from_torch_state_dict(_state_dict(model), depth=DEPTH)
  wide = widen_patch_embed(dit_vars, 3)
  assert wide["params"]["patch_embed"]["kernel"].shape == (PATCH, PATCH, IN_CH + 3, WIDTH)
  assert dit_vars["params"]["patch_embed"]["kernel"].shape == (PATCH, PATCH, IN_CH, WIDTH)
  x, t, text = _inputs(8)
  extra = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32) * 10
  base = _ours(dit_vars, cap_vars, IN_CH, x, t, text)
  widened = _ours(wide, cap_vars, IN_CH, np.concatenate([x, extra], axis=1), t, text)
  np.testing.assert_allclose(widened, base, atol=1e-5, rtol=0)


def test_widen_boxed_params_from_init():
  dit = DiT(out_channels=4, width=WIDTH, depth=1, num_heads=HEADS)
  v = jax.jit(dit.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)),
                        jnp.zeros((1, 2, WIDTH)))
  wide = widen_patch_embed(v, 2)
  kernel = wide["params"]["patch_embed"]["kernel"]
  assert kernel.unbox().shape == (2, 2, 6, WIDTH)
  assert kernel.names == v["params"]["patch_embed"]["kernel"].names
  assert not np.any(np.asarray(kernel.unbox())[:, :, 4:])


def test_wrong_shape_key_is_named():
  sd = _state_dict(_torch_model(IN_CH))
  sd["transformer_blocks.1.attn2.to_k.weight"] = np.zeros((WIDTH, 7), np.float32)
  with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn2\.to_k\.weight"):
    pixart_params_from_torch_state_dict(sd, depth=DEPTH)


def test_wrong_depth_lists_keys():
  sd = _state_dict(_torch_model(IN_CH))
  with pytest.raises(ValueError, match=r"unexpected keys.*transformer_blocks\.1\."):
    pixart_params_from_torch_state_dict(sd, depth=1)
