"""The image <-> latent maps the diffusion runs in, behind one interface: ``downsample``,
``latent_channels``, ``init_params(rng)``, ``encode(params, x)`` (NHWC in [-1, 1] -> scaled
latents) and ``decode(params, z)``. ``pixel`` is exact space-to-depth (tiny configs, tests);
``vae`` the Stable-Diffusion-compatible KL-f8 VAE.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmsr_jax.models import vae as vae_lib


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

  def abstract_params(self) -> dict:
    return {}

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


@dataclasses.dataclass(frozen=True)
class KLAutoencoder:
  """The KL VAE (`mmsr_jax.models.vae.AutoencoderKL`) behind the autoencoder interface.

  ``encode`` returns the posterior mean, shifted and scaled for diffusion:
  ``(mean - shift_factor) * scaling_factor``; ``decode`` inverts that map first. ``params`` is
  the inner Flax tree (no ``'params'`` level), as stored by ``params_io.save_params``.
  """

  config: vae_lib.VAEConfig = dataclasses.field(default_factory=vae_lib.VAEConfig)

  @property
  def downsample(self) -> int:
    return self.config.downsample_factor

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  @property
  def module(self) -> vae_lib.AutoencoderKL:
    return vae_lib.AutoencoderKL(self.config)

  def _init_fn(self, key):
    f = self.downsample
    return self.module.init(key, jnp.zeros((1, f, f, self.config.in_channels), jnp.float32))[
        "params"]

  def abstract_params(self):
    return jax.eval_shape(self._init_fn, jax.random.key(0))

  def init_params(self, rng) -> dict:
    # A random VAE only serves tests and demos; the counter-based 'rbg' generator (seeded from
    # `rng`) compiles several times faster on CPU than threefry for this many initialisers.
    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
    return jax.jit(self._init_fn)(key)

  def _shift(self) -> float:
    return 0.0 if self.config.shift_factor is None else self.config.shift_factor

  def encode(self, params, x: jax.Array) -> jax.Array:
    """Images ``[B, H, W, C]`` in [-1, 1] -> diffusion latents ``[B, H/f, W/f, c]``."""
    _, h, w, _ = x.shape
    f = self.downsample
    if h % f or w % f:
      raise ValueError(f"vae autoencoder: image {h}x{w} is not divisible by factor {f}")
    mean, _ = self.module.apply({"params": params}, x, method="encode")
    return (mean - self._shift()) * self.config.scaling_factor

  def decode(self, params, z: jax.Array) -> jax.Array:
    """Diffusion latents -> images (unclipped)."""
    z = z / self.config.scaling_factor + self._shift()
    return self.module.apply({"params": params}, z, method="decode")


def upsample_bicubic(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic upsampling of an NHWC batch (the LR path of the conditioning)."""
  b, _, _, c = x.shape
  return jnp.clip(jax.image.resize(x, (b, height, width, c), "cubic"), -1.0, 1.0)
