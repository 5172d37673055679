"""The frozen encoders (autoencoder, T5, VQGAN tokenizers) and how a batch becomes the inputs of
the trainable model: LR latent, text states, modality token ids and the diffusion target."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models import layers
from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vqgan as vqgan_lib


@dataclasses.dataclass(frozen=True)
class Conditioner:
  """The frozen encoders and how to turn a batch into the model's inputs."""

  autoencoder: object
  text_encoder: t5_lib.T5Encoder
  vq: vqgan_lib.VQGAN
  scale: int  # LR -> HR factor
  residual: bool = False  # diffuse residual_scale * (z_HR - z_LR) instead of z_HR
  residual_scale: float = 1.0
  vq_per_modality: bool = False  # params["vq"] stacked over (depth, seg, edge)
  # "shards": training batches carry the depth / seg ids precomputed by mmsr_jax.precompute
  ids_from: str = "encoder"
  text_len: int = 77  # caption tokens
  map_size: int = 256  # side of the rendered modality maps
  # Sequential passes the frozen encoders take over a batch: their activations (the VAE's at the
  # HR size) then live for 1/passes of the batch at a time, which bounds the per-chip batch.
  encode_passes: int = 1

  @property
  def vq_downsample(self) -> int:
    return self.vq.config.downsample_factor

  def _init_fns(self, rng) -> dict:
    r_ae, r_txt, r_vq = jax.random.split(rng, 3)
    l, m = self.text_len, self.map_size

    def text():
      return self.text_encoder.init(r_txt, jnp.zeros((1, l), jnp.int32),
                                    jnp.ones((1, l), jnp.int32))["params"]

    def vq():
      init = lambda r: self.vq.init(r, jnp.zeros((1, m, m, 3)))["params"]  # noqa: E731
      if self.vq_per_modality:  # one tokenizer per modality: a tree stacked over them
        return jax.vmap(init)(jax.random.split(r_vq, len(MODALITIES)))
      return init(r_vq)

    return {"ae": lambda: self.autoencoder.init_params(r_ae), "text": text, "vq": vq}

  def abstract_params(self, part: str):
    """Shapes and dtypes of one frozen part's weights (``'ae'``, ``'text'`` or ``'vq'``)."""
    if part == "ae":
      return self.autoencoder.abstract_params()
    return jax.eval_shape(self._init_fns(jax.random.key(0))[part])

  def random_params(self, part: str, rng):
    """A deterministic random initialisation of one frozen part (tiny configs and tests)."""
    fn = self._init_fns(rng)[part]
    return fn() if part == "ae" else jax.jit(fn)()

  def text_states(self, params, ids, mask):
    return self.text_encoder.apply({"params": params["text"]}, ids, mask)

  def _in_passes(self, fn, x):
    """``fn`` over the batch ``x`` in sequential passes, as many as the greatest common divisor
    of the batch and :attr:`encode_passes` (interleaved rows, so each pass spreads over every
    device of a batch-sharded array); the same result."""
    n = math.gcd(x.shape[0], max(1, self.encode_passes))
    return layers.map_rows(fn, (x,), x.shape[0] // n, interleave=True)

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
      i = MODALITIES.index(name)
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
    return self.target_of_latent(self.encode_image(params, hr), lr_latent)

  def target_of_latent(self, z_hr, lr_latent):
    """:meth:`diffusion_target` from the HR latent itself (e.g. precomputed)."""
    z_hr = z_hr.astype(lr_latent.dtype)
    return (z_hr - lr_latent) * self.residual_scale if self.residual else z_hr

  def batch_target(self, params, batch, lr_latent):
    """The training batch's ``x0``: from its precomputed ``hr_latent`` when it has one (the
    shards' crop banks), else by encoding its ``hr`` crop."""
    if "hr_latent" in batch:
      return self.target_of_latent(batch["hr_latent"], lr_latent)
    z_hr = self._in_passes(lambda hr: self.encode_image(params, hr), batch["hr"])
    return self.target_of_latent(z_hr, lr_latent)

  def sample_latent(self, x0, lr_latent):
    """Inverse of :meth:`diffusion_target`: a sampled ``x0`` -> the autoencoder latent."""
    return x0 / self.residual_scale + lr_latent if self.residual else x0

  def decode_sample(self, params, x0, lr_latent):
    """A sampled ``x0`` -> image (:meth:`sample_latent`, then the decoder)."""
    return self.decode(params, self.sample_latent(x0, lr_latent))

  def __call__(self, params, batch):
    """Frozen part of a step: batch -> LR latent, text states and mask, modality ids.

    Precomputed parts of a training batch (read from the shards) are used as they are: with
    ``ids_from='shards'`` its ``vq_ids`` give the depth and seg ids and only the edge maps are
    encoded (Canny of the degraded LR, new every step); its ``text_states`` replace the text
    encoder. A batch without them, like the report's held-out examples, is encoded whole.
    """
    out_hw = (batch["lr"].shape[1] * self.scale, batch["lr"].shape[2] * self.scale)
    if self.ids_from == "shards" and "vq_ids" in batch:
      if "edge" not in batch:
        raise ValueError("config.vq.ids_from='shards': the batch has 'vq_ids' but no 'edge' maps "
                         "(edge ids are encoded every step)")
      edge = self._in_passes(lambda m: self.modality_ids_of(params, "edge", m), batch["edge"])
      ids = jnp.concatenate([batch["vq_ids"][:, :2].astype(jnp.int32), edge[:, None]], axis=1)
    elif self.ids_from == "shards" and not all(
        k in batch for k in MODALITIES):
      raise ValueError("config.vq.ids_from='shards' but the batch has neither 'vq_ids' (token "
                       "ids written by python -m mmsr_jax.precompute --crop_size=...) nor the "
                       "depth / seg / edge maps to encode; use ids_from='encoder'")
    else:
      maps = jnp.stack([batch[k] for k in MODALITIES], axis=1)
      ids = self._in_passes(lambda m: self.modality_ids(params, m), maps)
    return dict(
        lr_latent=self._in_passes(lambda lr: self.lr_latent(params, lr, out_hw), batch["lr"]),
        text_states=(batch["text_states"] if "text_states" in batch else
                     self.text_states(params, batch["text_ids"], batch["text_mask"])),
        text_mask=batch["text_mask"],
        ids=ids,
    )
