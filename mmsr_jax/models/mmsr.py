"""The MMSR model: frozen condition encoders plus the trainable context connector and DiT.

* :class:`MMSR` (trainable, one Flax module): ``encode_context`` (modality tokens + MMLC) and
  ``denoise`` (the DiT on ``[z_t ++ LR latent]``). The context does not depend on the timestep,
  so the sampler computes it once per image, not once per step.
* :class:`Conditioner` (frozen): the autoencoder, the T5 text encoder and the VQGAN tokenizer,
  with their parameters loaded from the paths in the config (or, where a path is empty, a
  deterministic random initialisation, which only the tiny configuration uses).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsr_jax.weights import params_io
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models import context as context_lib
from mmsr_jax.models import dit as dit_lib
from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vqgan as vqgan_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config):
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"config.compute_dtype={config.compute_dtype!r}: expected one of "
                     f"{sorted(DTYPES)}")
  return DTYPES[config.compute_dtype]


class MMSR(nn.Module):
  """The trainable part: multimodal context connector and the DiT denoiser."""

  latent_channels: int
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float
  pos_base_size: int
  codebook_size: int
  token_grid: tuple[int, int]
  context_latents: int
  context_depth: int
  context_heads: int
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.context = context_lib.MultimodalContext(
        width=self.width, codebook_size=self.codebook_size, token_grid=self.token_grid,
        num_latents=self.context_latents, depth=self.context_depth,
        num_heads=self.context_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype)
    self.dit = dit_lib.DiT(
        out_channels=self.latent_channels, width=self.width, depth=self.depth,
        num_heads=self.num_heads, patch_size=self.patch_size, mlp_ratio=self.mlp_ratio,
        pos_base_size=self.pos_base_size, remat=self.remat, dtype=self.dtype)

  def encode_context(self, text_states, text_mask, ids, present, temperature=None):
    return self.context(text_states, text_mask, ids, present, temperature)

  def denoise(self, z_t, t, lr_latent, context):
    return self.dit(jnp.concatenate([z_t, lr_latent.astype(z_t.dtype)], axis=-1), t, context)

  def __call__(self, z_t, t, lr_latent, text_states, text_mask, ids, present, temperature=None):
    return self.denoise(z_t, t, lr_latent,
                        self.encode_context(text_states, text_mask, ids, present, temperature))


@dataclasses.dataclass(frozen=True)
class Conditioner:
  """The frozen encoders and how to turn a batch into the model's inputs."""

  autoencoder: object
  text_encoder: t5_lib.T5Encoder
  vq: vqgan_lib.VQGAN
  vq_downsample: int
  scale: int  # LR -> HR factor
  residual: bool = False  # diffuse residual_scale * (z_HR - z_LR) instead of z_HR
  residual_scale: float = 1.0
  vq_per_modality: bool = False  # params["vq"] stacked over (depth, seg, edge)
  # "shards": training batches carry the depth / seg ids precomputed by mmsr_jax.tokenize
  ids_from: str = "encoder"

  @classmethod
  def from_config(cls, config) -> "Conditioner":
    vq_cfg = vqgan_lib.VQGANConfig(**_as_dict(config.vq.arch))
    return cls(
        autoencoder=ae_lib.make_autoencoder(config.autoencoder),
        text_encoder=t5_lib.T5Encoder(t5_lib.T5Config(**_as_dict(config.text.encoder))),
        vq=vqgan_lib.VQGAN(vq_cfg),
        vq_downsample=2 ** (len(vq_cfg.block_out_channels) - 1),
        scale=config.data.scale,
        residual=config.diffusion.residual,
        residual_scale=config.diffusion.residual_scale,
        vq_per_modality=bool(config.vq.get("per_modality", False)),
        ids_from=_check_ids_from(config.vq.get("ids_from", "encoder")))

  def init_params(self, config, rng) -> dict:
    """Loads frozen weights from the configured paths, else initialises them from ``rng``."""
    r_ae, r_txt, r_vq = jax.random.split(rng, 3)
    l = config.text.max_length
    m = config.data.map_size
    def vq_init():
      init = lambda r: self.vq.init(r, jnp.zeros((1, m, m, 3)))["params"]  # noqa: E731
      if self.vq_per_modality:  # one tokenizer per modality: a tree stacked over the modalities
        return jax.vmap(init)(jax.random.split(r_vq, len(context_lib.SPATIAL_MODALITIES)))
      return init(r_vq)
    def load_or_init(path, field, init_fn):
      abstract = jax.eval_shape(init_fn)
      if path:
        return params_io.load_params(path, abstract, field=field)
      return jax.jit(init_fn)()
    return {
        "ae": self.autoencoder.init_params(r_ae),
        "text": load_or_init(
            config.text.params, "config.text.params",
            lambda: self.text_encoder.init(r_txt, jnp.zeros((1, l), jnp.int32),
                                           jnp.ones((1, l), jnp.int32))["params"]),
        "vq": load_or_init(config.vq.params, "config.vq.params", vq_init),
    }

  def text_states(self, params, ids, mask):
    return self.text_encoder.apply({"params": params["text"]}, ids, mask)

  def modality_ids(self, params, maps):
    """``maps [B, 3, M, M, 3]`` in [-1, 1] -> VQ ids ``[B, 3, M/f, M/f]``."""
    b, k = maps.shape[:2]
    if self.vq_per_modality:
      encode = lambda p, x: self.vq.apply({"params": p}, x, method=vqgan_lib.VQGAN.encode_ids)  # noqa: E731
      return jnp.swapaxes(jax.vmap(encode)(params["vq"], jnp.swapaxes(maps, 0, 1)), 0, 1)
    ids = self.vq.apply({"params": params["vq"]}, maps.reshape(b * k, *maps.shape[2:]),
                        method=vqgan_lib.VQGAN.encode_ids)
    return ids.reshape(b, k, *ids.shape[1:])

  def modality_ids_of(self, params, name, maps):
    """VQ ids ``[B, M/f, M/f]`` of one modality's maps ``[B, M, M, 3]`` (its own tokenizer when
    there is one per modality)."""
    p = params["vq"]
    if self.vq_per_modality:
      i = context_lib.SPATIAL_MODALITIES.index(name)
      p = jax.tree.map(lambda a: a[i], p)
    return self.vq.apply({"params": p}, maps, method=vqgan_lib.VQGAN.encode_ids)

  def encode_image(self, params, x):
    return self.autoencoder.encode(params["ae"], x)

  def decode(self, params, z):
    return self.autoencoder.decode(params["ae"], z)

  def lr_latent(self, params, lr, out_hw):
    """Bicubic-upsample the LR image to the output size and encode it."""
    return self.encode_image(params, ae_lib.upsample_bicubic(lr, *out_hw))

  def diffusion_target(self, params, hr, lr_latent):
    """The clean sample ``x0`` the diffusion learns: ``z_HR``, or the scaled residual."""
    z = self.encode_image(params, hr)
    return (z - lr_latent) * self.residual_scale if self.residual else z

  def sample_latent(self, x0, lr_latent):
    """Inverse of :meth:`diffusion_target`: a sampled ``x0`` -> the autoencoder latent."""
    return x0 / self.residual_scale + lr_latent if self.residual else x0

  def decode_sample(self, params, x0, lr_latent):
    """A sampled ``x0`` -> image (:meth:`sample_latent`, then the decoder)."""
    return self.decode(params, self.sample_latent(x0, lr_latent))

  def __call__(self, params, batch):
    """Frozen part of a step: batch -> (x0 latent or None, LR latent, text states, mask, ids).

    With ``ids_from='shards'`` a batch that has ``'vq_ids'`` (the training pipeline's, read from
    the shards' crop banks) takes its depth and seg ids from there and encodes only the edge maps
    (Canny of the degraded LR, new every step, so never precomputed). A batch without them, like
    the held-out examples of the report, which are not read from shards, is encoded whole.
    """
    out_hw = (batch["lr"].shape[1] * self.scale, batch["lr"].shape[2] * self.scale)
    if self.ids_from == "shards" and "vq_ids" in batch:
      if "edge" not in batch:
        raise ValueError("config.vq.ids_from='shards': the batch has 'vq_ids' but no 'edge' maps "
                         "(edge ids are encoded every step)")
      edge = self.modality_ids_of(params, "edge", batch["edge"])
      ids = jnp.concatenate([batch["vq_ids"][:, :2].astype(jnp.int32), edge[:, None]], axis=1)
    elif self.ids_from == "shards" and not all(
        k in batch for k in context_lib.SPATIAL_MODALITIES):
      raise ValueError("config.vq.ids_from='shards' but the batch has neither 'vq_ids' (token "
                       "ids written by python -m mmsr_jax.tokenize --crop_size=...) nor the "
                       "depth / seg / edge maps to encode; use ids_from='encoder'")
    else:
      maps = jnp.stack([batch[k] for k in context_lib.SPATIAL_MODALITIES], axis=1)
      ids = self.modality_ids(params, maps)
    return dict(
        lr_latent=self.lr_latent(params, batch["lr"], out_hw),
        text_states=self.text_states(params, batch["text_ids"], batch["text_mask"]),
        text_mask=batch["text_mask"],
        ids=ids,
    )


def build_model(config) -> MMSR:
  """The trainable module for a config (checks the sizes that must agree)."""
  mc = config.model
  latent_size = config.data.hr_size // config.autoencoder.factor
  if latent_size % mc.patch_size:
    raise ValueError(f"config.data.hr_size={config.data.hr_size} gives a {latent_size}px latent, "
                     f"not divisible by config.model.patch_size={mc.patch_size}")
  vq_down = 2 ** (len(config.vq.arch.block_out_channels) - 1)
  if config.data.map_size % vq_down:
    raise ValueError(f"config.data.map_size={config.data.map_size} is not divisible by the VQ "
                     f"downsampling factor {vq_down}")
  grid = config.data.map_size // vq_down
  latent_channels = ae_lib.make_autoencoder(config.autoencoder).latent_channels
  return MMSR(
      latent_channels=latent_channels, width=mc.width, depth=mc.depth, num_heads=mc.num_heads,
      patch_size=mc.patch_size, mlp_ratio=mc.mlp_ratio,
      pos_base_size=latent_size // mc.patch_size,
      codebook_size=config.vq.arch.num_vq_embeddings, token_grid=(grid, grid),
      context_latents=mc.context_latents, context_depth=mc.context_depth,
      context_heads=mc.context_heads, remat=mc.remat, dtype=compute_dtype(config))


def _check_ids_from(value: str) -> str:
  if value not in ("encoder", "shards"):
    raise ValueError(f"config.vq.ids_from={value!r}: expected 'encoder' or 'shards'")
  return value


def _as_dict(cfg) -> dict:
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
