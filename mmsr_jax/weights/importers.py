"""Public PyTorch weights (diffusers ``AutoencoderKL`` / ``VQModel``, transformers T5) as the
Flax trees of ``mmsr_jax.models``: key mapping and layout transposes, checked key by key."""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vae as vae_lib
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.weights import torch_import

# Older diffusers checkpoints name the attention projections differently.
_LEGACY_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def vqgan_param_shapes(config: vqgan_lib.VQGANConfig) -> dict[str, Any]:
  """Abstract variables ({'params': tree of ShapeDtypeStruct}) of a VQGAN."""
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: vqgan_lib.VQGAN(config).init(jax.random.key(0), x), x)


def _flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  parts = []
  for name in path:
    m = re.fullmatch(r"(.*)_(\d+)", name)
    parts.extend([m.group(1), m.group(2)] if m else [name])
  leaf = parts[-1]
  parts[-1] = "bias" if leaf == "bias" else "weight"  # kernel/scale/embedding
  return ".".join(parts)


def _torch_to_flax_array(leaf: str, arr: np.ndarray,
                         expected: tuple[int, ...]) -> np.ndarray:
  """Reorders a torch tensor into the Flax layout of `expected` rank."""
  if leaf == "kernel" and len(expected) == 4 and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and len(expected) == 2:
    if arr.ndim == 4 and arr.shape[2:] == (1, 1):
      arr = arr[:, :, 0, 0]  # a 1x1 conv used as a linear layer
    if arr.ndim == 2:
      return arr.T  # (out, in) -> (in, out)
  return arr


def vqgan_params_from_torch_state_dict(
    state_dict: Mapping[str, Any], config: vqgan_lib.VQGANConfig) -> dict[str, Any]:
  """Converts a diffusers `VQModel` state dict to VQGAN variables.

  Args:
    state_dict: torch key -> array (numpy, or anything `np.asarray` takes),
      e.g. from `safetensors.numpy.load_file`.
    config: the architecture the weights belong to.

  Returns:
    {'params': tree} ready for `VQGAN(config).apply(variables, ...)`; all
    leaves are float32 numpy arrays.

  Raises:
    ValueError: on a shape mismatch (naming the key and both shapes) or on
      missing / unexpected keys (listing them).
  """
  sd = {}
  for key, value in state_dict.items():
    for old, new in _LEGACY_ATTENTION_NAMES.items():
      key = key.replace(old, new)
    sd[key] = value
  return torch_import.convert_state_dict(
      sd, vqgan_param_shapes(config)["params"], torch_key=_flax_path_to_torch_key,
      to_flax=lambda path, src, shape: _torch_to_flax_array(path[-1], src, shape),
      model_name="VQGAN")


def vae_param_shapes(config: vae_lib.VAEConfig) -> dict[str, Any]:
  """Abstract variables (``{'params': tree of ShapeDtypeStruct}``) of an `AutoencoderKL`."""
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: vae_lib.AutoencoderKL(config).init(jax.random.key(0), x), x)


def vae_params_from_torch_state_dict(state_dict: Mapping[str, Any],
                                     config: vae_lib.VAEConfig) -> dict[str, Any]:
  """Converts a diffusers `AutoencoderKL` state dict to `AutoencoderKL` variables.

  Args:
    state_dict: torch key -> array (numpy, or anything `np.asarray` takes), e.g. from
      `safetensors.numpy.load_file`. Legacy attention names (query/key/value/proj_attn) are
      accepted.
    config: the architecture the weights belong to.

  Returns:
    ``{'params': tree}`` of float32 numpy arrays.

  Raises:
    ValueError: on a shape mismatch or on missing / unexpected keys.
  """
  sd = {}
  for key, value in state_dict.items():
    for old, new in _LEGACY_ATTENTION_NAMES.items():
      key = key.replace(old, new)
    sd[key] = value
  return torch_import.convert_state_dict(
      sd, vae_param_shapes(config)["params"], torch_key=_flax_path_to_torch_key,
      to_flax=lambda path, src, shape: _torch_to_flax_array(path[-1], src, shape),
      model_name="AutoencoderKL")


def t5_param_shapes(config: t5_lib.T5Config) -> dict[str, Any]:
  """Abstract variables ({'params': tree of ShapeDtypeStruct}) of an encoder."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(
      lambda i: t5_lib.T5Encoder(config).init(jax.random.key(0), i), ids)


def _t5_torch_key(path: tuple[str, ...]) -> str:
  if path[0] == "shared":
    return "shared.weight"
  if path[0] == "final_layer_norm":
    return "encoder.final_layer_norm.weight"
  if path[0] == "relative_attention_bias":  # shared by all layers; transformers keeps it in 0
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  block, layer, *inner = path[:-1]
  b, l = block.split("_")[1], layer.split("_")[1]
  return ".".join(["encoder.block", b, "layer", l, *inner, "weight"])


def t5_params_from_torch_state_dict(
    state_dict: Mapping[str, Any], config: t5_lib.T5Config,
    ignore_prefixes: tuple[str, ...] = ("decoder.", "lm_head.")
) -> dict[str, Any]:
  """Converts a transformers T5 state dict to `T5Encoder` variables.

  Args:
    state_dict: torch key -> array (numpy or anything `np.asarray` takes), from
      `T5EncoderModel` or a full `T5ForConditionalGeneration` checkpoint.
    config: the encoder architecture the weights belong to.
    ignore_prefixes: keys skipped silently (the decoder of a full model).

  Returns:
    {'params': tree} for `t5_lib.T5Encoder(config).apply`; float32 numpy leaves.

  Raises:
    ValueError: on a shape mismatch (naming the key and both shapes) or on
      missing / unexpected keys (listing them).
  """
  sd = {k: v for k, v in state_dict.items()
        if not k.startswith(tuple(ignore_prefixes))}
  # The token embedding is tied: accept either name, or both.
  alias = "encoder.embed_tokens.weight"
  if alias in sd:
    tied = sd.pop(alias)
    sd.setdefault("shared.weight", tied)
  return torch_import.convert_state_dict(
      sd, t5_param_shapes(config)["params"], torch_key=_t5_torch_key,
      to_flax=lambda path, src, shape: src.T if path[-1] == "kernel" and src.ndim == 2 else src,
      model_name="T5")
