"""Autoencoders: the image <-> latent map the diffusion runs in.

All autoencoders share one small interface, so the trainer and sampler never ask which one they
hold:

* ``downsample``: spatial factor image -> latent; ``latent_channels``;
* ``init_params(rng) -> params`` (frozen: they never enter the optimizer);
* ``encode(params, x) -> z`` for images in ``[-1, 1]``, NHWC, already scaled for diffusion;
* ``decode(params, z) -> x``.

``pixel`` is exact space-to-depth (no parameters) and serves the tiny CPU configuration and the
tests. ``vae`` is the Stable-Diffusion-compatible KL-f8 autoencoder (``KLAutoencoder``); its
weights come from ``config.autoencoder.params`` (a safetensors file of the Flax tree, e.g. from
``vae.vae_params_from_torch_state_dict`` + ``params_io.save_params``), else a random init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmsr_jax.weights import params_io
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
  params_path: str = ""

  @property
  def downsample(self) -> int:
    return self.config.downsample_factor

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  @property
  def module(self) -> vae_lib.AutoencoderKL:
    return vae_lib.AutoencoderKL(self.config)

  def init_params(self, rng) -> dict:
    """Loads ``params_path`` (safetensors) when set, else initialises from ``rng``."""
    f = self.downsample
    x = jnp.zeros((1, f, f, self.config.in_channels), jnp.float32)
    init_fn = lambda key: self.module.init(key, x)["params"]
    if self.params_path:
      return params_io.load_params(self.params_path, jax.eval_shape(init_fn, rng),
                                   field="config.autoencoder.params")
    # A random VAE only serves tests and demos; the counter-based 'rbg' generator (seeded from
    # `rng`) compiles several times faster on CPU than threefry for this many initialisers.
    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="unsafe_rbg")
    return jax.jit(init_fn)(key)

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

  def decode_tiled(self, params, z: jax.Array, *, tile_latent: int = 64,
                   overlap_latent: int = 16) -> jax.Array:
    """`decode` on overlapping latent tiles, one at a time, raised-cosine blend (large images).

    Equals `decode` when ``z`` fits in one tile; see `vae.tiled_decode`.
    """
    dec = jax.jit(self.decode)
    return vae_lib.tiled_decode(lambda t: dec(params, t), z, factor=self.downsample,
                                tile_latent=tile_latent, overlap_latent=overlap_latent)


def _as_dict(d) -> dict:
  if d is None:
    return {}
  return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def make_autoencoder(cfg):
  """Builds the autoencoder named by ``config.autoencoder.kind``."""
  if cfg.kind == "pixel":
    return PixelAutoencoder(factor=cfg.factor, scaling_factor=cfg.scaling_factor)
  if cfg.kind == "vae":
    arch = _as_dict(cfg.get("arch", None))
    shift = cfg.get("shift_factor", None)
    vae_cfg = vae_lib.VAEConfig(**dict(
        arch, scaling_factor=float(cfg.scaling_factor),
        shift_factor=None if shift is None else float(shift)))
    if vae_cfg.downsample_factor != cfg.factor:
      raise ValueError(
          f"config.autoencoder.factor={cfg.factor} but config.autoencoder.arch has "
          f"{len(vae_cfg.block_out_channels)} blocks (factor {vae_cfg.downsample_factor})")
    return KLAutoencoder(vae_cfg, params_path=cfg.get("params", "") or "")
  raise ValueError(f"config.autoencoder.kind={cfg.kind!r}: expected 'pixel' or 'vae'")


def upsample_bicubic(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic upsampling of an NHWC batch (the LR path of the conditioning)."""
  b, _, _, c = x.shape
  return jnp.clip(jax.image.resize(x, (b, height, width, c), "cubic"), -1.0, 1.0)
