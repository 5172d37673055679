"""Latent tiling: sampling outputs larger than the trained size, the tile batch spread over devices.

The denoiser was trained on latents of one size (``config.data.hr_size / autoencoder factor``).
For a larger output the latent is covered by overlapping tiles of that size (:class:`TileGrid`).
At every DDIM step all tiles of all images are cut out of the current latent, stacked into one
batch (positive and negative guidance branches included), denoised in one forward pass whose batch
is split over the ``data`` axis of a mesh of all devices, and the predictions are blended back with
a normalised raised-cosine window. The DDIM update then runs on the whole latent, so neighbouring
tiles always start each step from the same values in their overlap and no seam can build up.
Finally the autoencoder decodes the whole latent (the KL VAE tile by tile when the latent is
larger than a decoder tile, sequentially and with the same blending; the pixel autoencoder is
exact space-to-depth). The LR image is encoded the same way.

Conditioning per tile (a choice of this project): each tile gets the LR latent of its own region
and the modality maps of its own region (the LR crop's Canny edges, the crop of a user-supplied or
annotated depth / segmentation map, rendered at the map size), which is what the model saw in
training (maps of the training crop). The caption is one per image and shared by all its tiles.

An image whose latent fits in one tile goes through exactly the ops of the untiled sampler
(:func:`mmsr_jax.sampler.make_sample_fn`): its blend weight is exactly 1, so the two agree to
float round-off (the tile batch may be padded to the device count, see ``tests/test_sample.py``
for the measured tolerance).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.runtime import sharding
# The tile geometry lives below the models (the KL VAE tiles with it too); re-exported here.
from mmsr_jax.diffusion.tiles import VAE_TILE, TileGrid, vae_tiled
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models.mmsr import MMSR, Conditioner
from mmsr_jax.diffusion.sampler import negative_branch

def make_grid(config, lr_hw: tuple[int, int], *, tile: int | None = None,
              overlap: int | None = None) -> TileGrid:
  """The tile grid for a (padded) LR size: tiles of the trained latent size by default, overlap a
  quarter tile; both in latent pixels, rounded to the patch size."""
  f = config.autoencoder.factor
  s = config.data.scale
  p = config.model.patch_size
  latent = tuple(v * s // f for v in lr_hw)
  if any(v * s % f for v in lr_hw):
    raise ValueError(f"LR size {lr_hw} x{s} is not divisible by the autoencoder factor {f}")
  tile = config.data.hr_size // f if tile is None else int(tile)
  if tile < p or tile % p:
    raise ValueError(f"tile={tile}: expected a positive multiple of the patch size {p} "
                     "(latent pixels)")
  overlap = (tile // 4) // p * p if overlap is None else int(overlap)
  if not 0 <= overlap < tile:
    raise ValueError(f"tile_overlap={overlap}: expected 0 <= overlap < tile ({tile})")
  return TileGrid(latent, tile, overlap, p)


def num_shards(mesh) -> int:
  """How many ways the batch dimension is split on ``mesh`` (1 without a mesh)."""
  if mesh is None:
    return 1
  n = mesh.devices.size
  return n // sharding.batch_sharding(mesh).shard_shape((n,))[0]


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  """Pads the batch dimension to ``rows`` by repeating the last row (results are dropped)."""
  extra = rows - x.shape[0]
  if not extra:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])


def _chunked(fn: Callable, args: tuple, cap: int | None, multiple: int = 1):
  """``fn(*args)`` over the leading dimension in sequential chunks of at most about ``cap`` rows
  (equal chunks, each a multiple of ``multiple``; one ``lax.map``, so only one chunk's activations
  are live); all rows at once when ``cap`` is None or not smaller than the row count (then
  exactly ``fn(*args)``)."""
  rows = args[0].shape[0]
  if cap is None or rows <= cap:
    return fn(*args)
  k = -(-rows // cap)
  chunk = -(-(-(-rows // k)) // multiple) * multiple
  k = -(-rows // chunk)
  stacked = tuple(_pad_rows(a, k * chunk).reshape(k, chunk, *a.shape[1:]) for a in args)
  out = jax.lax.map(lambda xs: fn(*xs), stacked)
  return out.reshape(k * chunk, *out.shape[2:])[:rows]


def _encode(conditioner: Conditioner, frozen, x: jax.Array) -> jax.Array:
  """The autoencoder's encode; the KL VAE encodes large images tile by tile."""
  ae = conditioner.autoencoder
  if isinstance(ae, ae_lib.KLAutoencoder) and max(x.shape[1:3]) > VAE_TILE * ae.downsample:
    return vae_tiled(lambda t: conditioner.encode_image(frozen, t), x, unit_in=ae.downsample,
                     unit_out=1)
  return conditioner.encode_image(frozen, x)


def _decode_sample(conditioner: Conditioner, frozen, x0: jax.Array, lr_latent: jax.Array):
  """Sampled diffusion variable -> image; the KL VAE decodes large latents tile by tile."""
  ae = conditioner.autoencoder
  if isinstance(ae, ae_lib.KLAutoencoder) and max(x0.shape[1:3]) > VAE_TILE:
    return vae_tiled(lambda t: conditioner.decode(frozen, t),
                     conditioner.sample_latent(x0, lr_latent), unit_in=1, unit_out=ae.downsample)
  return conditioner.decode_sample(frozen, x0, lr_latent)


def make_tiled_sample_fn(model: MMSR, conditioner: Conditioner, schedule: diffusion.Schedule,
                         grid: TileGrid, *, steps: int, guidance: str = "mcfg",
                         spacing: str = "leading", clip_x0: float = 0.0, strength: float = 1.0,
                         mesh=None, progress: Callable[[], None] | None = None,
                         tile_batch: int | None = None, map_batch: int | None = None):
  """Returns ``sample(params, frozen, inputs, rng, scale, eta) -> images [B, H, W, 3]`` in [-1, 1].

  ``inputs`` (see :func:`make_tiled_inputs`): ``lr [B, h, w, 3]`` the whole (padded) LR images;
  per tile, image-major, ``maps [B*n, 3, M, M, 3]`` and ``present [B*n, 3]``; per image
  ``text_ids/text_mask``, ``neg_ids/neg_mask``, ``null_ids/null_mask`` ``[B, L]`` and
  ``temperature [B, 4]``. Instead of the ids, ``states [B or 2B, L, D]`` and ``states_mask``
  may give text-encoder outputs computed beforehand (positive rows first, then the negative
  branch's), so the text encoder need not sit in accelerator memory while sampling.

  ``mesh``: the tile batch (all tiles of all images, both guidance branches) is padded to a
  multiple of the data-axis size and split over it. ``progress`` is called on the host once per
  DDIM step (``jax.debug.callback``; the loop stays one jitted ``fori_loop``).

  Memory of large outputs: ``tile_batch`` caps the rows (tiles x guidance branches, a multiple
  of the data-axis size) of one denoiser pass and ``map_batch`` the tiles whose maps go through
  the VQ encoder at once; larger batches run as sequential chunks. None = everything in one pass.
  """
  first = diffusion.start_step(steps, strength)
  t_first = int(diffusion.ddim_timesteps(schedule.num_timesteps, steps, spacing)[first])
  guided = guidance != "none"
  if guided and guidance not in diffusion.GUIDANCE_MODES:
    raise ValueError(f"guidance={guidance!r}: expected one of {diffusion.GUIDANCE_MODES} or 'none'")
  weights = grid.weights()
  n = grid.num_tiles
  shards = num_shards(mesh)
  split = ((lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)))
           if mesh is not None and shards > 1 else (lambda x: x))

  @jax.jit
  def sample(params, frozen, inputs, rng, scale, eta):
    lr = inputs["lr"]
    b, h, w, _ = lr.shape
    out_hw = (h * conditioner.scale, w * conditioner.scale)
    upsample_lr = ae_lib.upsample_bicubic(lr, *out_hw)
    lr_latent = _encode(conditioner, frozen, upsample_lr)
    if lr_latent.shape[1:3] != grid.latent_hw:
      raise ValueError(f"LR {h}x{w} gives a {lr_latent.shape[1:3]} latent; the tile grid was "
                       f"made for {grid.latent_hw}")
    # --- Context per tile (both guidance branches), computed once.
    ids = _chunked(lambda m: conditioner.modality_ids(frozen, m), (inputs["maps"],), map_batch)
    present = inputs["present"].astype(bool)
    per_tile = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  per image -> per tile
    temperature = per_tile(inputs["temperature"])
    if "states" in inputs:
      states, mask = inputs["states"], inputs["states_mask"]
      pos_states, pos_mask = states[:b], mask[:b]
      neg_states, neg_mask = states[b:], mask[b:]
    else:
      text = (inputs["text_ids"], inputs["text_mask"])
      if guided:
        (n_ids, n_mask), _ = negative_branch(
            guidance, text, (inputs["neg_ids"], inputs["neg_mask"]),
            (inputs["null_ids"], inputs["null_mask"]), present)
        text = (jnp.concatenate([text[0], n_ids]), jnp.concatenate([text[1], n_mask]))
      all_states = conditioner.text_states(frozen, *text)
      pos_states, pos_mask = all_states[:b], text[1][:b]
      neg_states, neg_mask = all_states[b:], text[1][b:]
    pos_states, pos_mask = per_tile(pos_states), per_tile(pos_mask)
    if guided:
      _, n_present = negative_branch(guidance, None, None, None, present)
      states = jnp.concatenate([pos_states, per_tile(neg_states)])
      mask = jnp.concatenate([pos_mask, per_tile(neg_mask)])
      present, ids = jnp.concatenate([present, n_present]), jnp.concatenate([ids, ids])
      temperature = jnp.concatenate([temperature, temperature])
    else:
      states, mask = pos_states, pos_mask
    rows = states.shape[0]
    padded = -(-rows // shards) * shards
    ctx = model.apply({"params": params}, *(split(_pad_rows(a, padded)) for a in
                                            (states, mask, ids, present, temperature)),
                      method=MMSR.encode_context)
    lr_tiles = grid.gather(lr_latent)
    lr_rows = split(_pad_rows(jnp.concatenate([lr_tiles, lr_tiles]) if guided else lr_tiles,
                              padded))
    wts = jnp.asarray(weights)

    def denoise(z, t):
      if progress is not None:
        jax.debug.callback(lambda _: progress(), t[0])
      zt = grid.gather(z)
      tt = jnp.full((zt.shape[0],), t[0], jnp.int32)
      if guided:
        zt, tt = jnp.concatenate([zt, zt]), jnp.concatenate([tt, tt])
      dit = lambda z_, t_, l_, c_: model.apply(  # noqa: E731
          {"params": params}, split(z_), t_, split(l_), split(c_), method=MMSR.denoise)
      out = _chunked(dit, (_pad_rows(zt, padded), _pad_rows(tt, padded), lr_rows, ctx),
                     tile_batch, shards)[:rows]
      if guided:
        half = rows // 2
        out = diffusion.guided_prediction(out[:half], out[half:], scale)
      return grid.blend(out, wts)

    lat_shape = (b, *grid.latent_hw, conditioner.autoencoder.latent_channels)
    r_init, r_loop = jax.random.split(rng)
    z_init = jax.random.normal(r_init, lat_shape)
    if first:  # as the untiled sampler: the diffusion variable of an HR equal to the upsampled LR
      # (encoding it again would give lr_latent itself, so its residual is exactly zero)
      x0_lr = jnp.zeros_like(lr_latent) if conditioner.residual else lr_latent
      z_init = schedule.add_noise(x0_lr, z_init, jnp.full((b,), t_first))
    z = diffusion.ddim_sample(
        schedule, denoise, z_init, r_loop, steps=steps, eta=eta, scale=scale, guided=False,
        spacing=spacing, clip_x0=clip_x0 or None, first_step=first)
    return jnp.clip(_decode_sample(conditioner, frozen, z, lr_latent), -1.0, 1.0)

  return sample


def make_tiled_inputs(tile_examples: list[dict], lr_images: np.ndarray, num_tiles: int,
                      tokenizer, config, **kwargs) -> dict:
  """Sampler inputs from per-tile condition examples (image-major) and the whole LR images.

  ``lr_images [B, h, w, 3]`` in [-1, 1]; ``kwargs`` as :func:`mmsr_jax.sampler.make_inputs`
  (negative prompt, temperature, switches), which builds the per-tile fields.
  """
  from mmsr_jax.diffusion import sampler
  inputs = sampler.make_inputs(tile_examples, tokenizer, config, **kwargs)
  per_image = slice(None, None, num_tiles)
  for key in ("text_ids", "text_mask", "neg_ids", "neg_mask", "null_ids", "null_mask",
              "temperature"):
    inputs[key] = inputs[key][per_image]
  inputs["lr"] = np.asarray(lr_images, np.float32)
  return inputs
