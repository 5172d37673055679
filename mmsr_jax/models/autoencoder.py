"""Autoencoders: the image <-> latent map the diffusion runs in.

All autoencoders share one small interface, so the trainer and sampler never ask which one they
hold:

* ``downsample``: spatial factor image -> latent; ``latent_channels``;
* ``init_params(rng) -> params`` (frozen: they never enter the optimizer);
* ``encode(params, x) -> z`` for images in ``[-1, 1]``, NHWC, already scaled for diffusion;
* ``decode(params, z) -> x``.

``pixel`` is exact space-to-depth (no parameters) and serves the tiny CPU configuration and the
tests. ``vae`` is the Stable-Diffusion-compatible KL-f8 autoencoder, which needs imported weights
(``python -m mmsr_jax.convert --kind=vae``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PixelAutoencoder:
  """Space-to-depth by ``factor``: ``[B, H, W, C] -> [B, H/f, W/f, C*f*f]``, exactly invertible."""

  factor: int = 4
  channels: int = 3
  scaling_factor: float = 1.0

  @property
  def downsample(self) -> int:
    return self.factor

  @property
  def latent_channels(self) -> int:
    return self.channels * self.factor ** 2

  def init_params(self, rng) -> dict:
    del rng
    return {}

  def encode(self, params, x):
    del params
    b, h, w, c = x.shape
    f = self.factor
    if h % f or w % f:
      raise ValueError(f"pixel autoencoder: image {h}x{w} is not divisible by factor {f}")
    z = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h // f, w // f, f * f * c) * self.scaling_factor

  def decode(self, params, z):
    del params
    b, h, w, _ = z.shape
    f = self.factor
    x = (z / self.scaling_factor).reshape(b, h, w, f, f, self.channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, self.channels)


def make_autoencoder(cfg):
  """Builds the autoencoder named by ``config.autoencoder.kind``."""
  if cfg.kind == "pixel":
    return PixelAutoencoder(factor=cfg.factor, scaling_factor=cfg.scaling_factor)
  if cfg.kind == "vae":
    raise ValueError(
        "config.autoencoder.kind='vae': the SD-compatible KL VAE is not part of this build yet "
        "(it arrives with the pretrained-blocks work); use kind='pixel' for now.")
  raise ValueError(f"config.autoencoder.kind={cfg.kind!r}: expected 'pixel' or 'vae'")


def upsample_bicubic(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic upsampling of an NHWC batch (the LR path of the conditioning)."""
  b, _, _, c = x.shape
  return jnp.clip(jax.image.resize(x, (b, height, width, c), "cubic"), -1.0, 1.0)
