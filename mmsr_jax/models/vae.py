"""The Stable-Diffusion-compatible KL VAE with diffusers' ``AutoencoderKL`` tree; its encoder and
decoder blocks are the VQGAN's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

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
