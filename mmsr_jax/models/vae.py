"""Stable-Diffusion-compatible KL-f8 VAE with the module tree of diffusers' `AutoencoderKL`.

The encoder, decoder and their blocks are the ones of `mmsr_jax.models.vqgan` (taming /
diffusers architecture); the KL VAE only differs in

* the encoder emitting ``2 * latent_channels`` maps (mean and log-variance),
* ``quant_conv`` (1x1, ``2c -> 2c``) and ``post_quant_conv`` (1x1, ``c -> c``) around the
  latent, and no codebook.

Layout: NHWC everywhere, images as floats in ``[-1, 1]``.

Parameter tree (Flax names; ``_i`` where diffusers has a ``.i`` list index):
  encoder/{conv_in, down_blocks_i, mid_block, conv_norm_out, conv_out}, quant_conv,
  post_quant_conv, decoder/{conv_in, mid_block, up_blocks_i, conv_norm_out, conv_out}

`tiled_decode` / `tiled_encode` run the model on overlapping tiles, one at a time, and blend them
with a raised-cosine window (``mmsr_jax.tile_grid``), for images whose activations do not fit in
memory at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsr_jax.diffusion import tiles as tile_grid
from mmsr_jax.weights import torch_import
from mmsr_jax.models import vqgan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of the KL autoencoder (names follow diffusers `AutoencoderKL`).

  The defaults are those of the Stable Diffusion VAE (``sd-vae-ft-ema``); the spatial
  downsampling factor is ``2 ** (len(block_out_channels) - 1)``.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  mid_block_attention: bool = True
  # Compute dtype of convolutions / matmuls; parameters stay float32.
  dtype: str = "float32"

  def __post_init__(self):
    # Configs may hand over lists; keep the dataclass hashable.
    object.__setattr__(self, "block_out_channels",
                       tuple(int(c) for c in self.block_out_channels))

  @classmethod
  def tiny(cls) -> "VAEConfig":
    """A small f4 model for tests and CPU demos."""
    return cls(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
               norm_num_groups=8)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


class AutoencoderKL(nn.Module):
  """KL autoencoder. Call the parts with ``apply(..., method="encode" / "decode")``."""

  config: VAEConfig

  def setup(self):
    cfg = self.config
    dt = cfg.compute_dtype
    c = cfg.latent_channels
    self.encoder = vqgan.Encoder(cfg, double_z=True)
    self.quant_conv = vqgan._conv(2 * c, 1, dt, None)  # pylint: disable=protected-access
    self.post_quant_conv = vqgan._conv(c, 1, dt, None)  # pylint: disable=protected-access
    self.decoder = vqgan.Decoder(cfg)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """``[B, H, W, in_channels]`` in [-1, 1] -> (mean, logvar), each ``[B, H/f, W/f, c]``.

    Values are unscaled (before ``scaling_factor``); logvar is not clipped.
    """
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, logvar

  def decode(self, z: Array) -> Array:
    """Unscaled latent ``[B, h, w, c]`` -> image ``[B, h*f, w*f, out_channels]``."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the posterior mean (also used to initialise all parameters)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def vae_param_shapes(config: VAEConfig) -> dict[str, Any]:
  """Abstract variables (``{'params': tree of ShapeDtypeStruct}``) of an `AutoencoderKL`."""
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x), x)


def vae_params_from_torch_state_dict(state_dict: Mapping[str, Any],
                                     config: VAEConfig) -> dict[str, Any]:
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
  # pylint: disable=protected-access
  sd = {}
  for key, value in state_dict.items():
    for old, new in vqgan._LEGACY_ATTENTION_NAMES.items():
      key = key.replace(old, new)
    sd[key] = value
  return torch_import.convert_state_dict(
      sd, vae_param_shapes(config)["params"], torch_key=vqgan._flax_path_to_torch_key,
      to_flax=lambda path, src, shape: vqgan._torch_to_flax_array(path[-1], src, shape),
      model_name="AutoencoderKL")


# ---------------------------------------------------------------------------
# Tiled application.
# ---------------------------------------------------------------------------


def tiled_decode(apply_decode: Callable[[Array], Array], z: Array, *, factor: int = 8,
                 tile_latent: int = 64, overlap_latent: int = 16) -> Array:
  """Decodes ``z [B, h, w, c]`` on overlapping latent tiles (``mmsr_jax.tile_grid.vae_tiled``:
  one tile at a time, raised-cosine blend; the sampler's tiled decode).

  Args:
    apply_decode: latent -> image ``[B, h'*factor, w'*factor, C]`` for any tile size.
    z: the latent.
    factor: the decoder's upsampling factor.
    tile_latent: tile side in latent pixels.
    overlap_latent: latent pixels shared by neighbouring tiles.

  A latent within one tile gives exactly ``apply_decode(z)`` (as float32). Elsewhere the result
  differs a little from the untiled decode (border padding, per-tile group-norm statistics and
  attention), but the blend hides the seams.
  """
  return tile_grid.vae_tiled(apply_decode, z, unit_in=1, unit_out=factor, tile=tile_latent,
                             overlap=overlap_latent)


def tiled_encode(apply_encode: Callable[[Array], Any], x: Array, *, factor: int = 8,
                 tile_latent: int = 64, overlap_latent: int = 16) -> Any:
  """Encodes ``x [B, H, W, C]`` on overlapping tiles (sides in latent pixels) and blends them.

  ``apply_encode`` may return one array or a pytree of latents (e.g. ``(mean, logvar)``); each
  is blended. ``H`` and ``W`` must be multiples of ``factor``. An image within one tile gives
  exactly ``apply_encode(x)`` (as float32).
  """
  return tile_grid.vae_tiled(apply_encode, x, unit_in=factor, unit_out=1, tile=tile_latent,
                             overlap=overlap_latent)
