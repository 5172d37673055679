"""The super-resolution sampler: conditions -> guided DDIM -> decoded image, one ``jax.jit``.

Outputs larger than the trained size are sampled on overlapping latent tiles of the trained size
(:class:`~mmsr_jax.diffusion.tiles.TileGrid`): at every DDIM step all tiles of all images (both
guidance branches) go through the denoiser as one batch split over the devices, and the
predictions are blended with a normalised raised-cosine window before the DDIM update on the
whole latent, so no seam can build up. Each tile is conditioned on its own LR latent and maps;
the caption is per image. Everything that may change between calls without changing shapes
(guidance scale, eta, temperatures, switches, seed) is a traced argument.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.diffusion.tiles import VAE_TILE, TileGrid, vae_tiled
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models import layers
from mmsr_jax.models.conditioner import Conditioner
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.runtime import sharding


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


def _chunked(fn: Callable, args: tuple, cap: int | None, multiple: int = 1):
  """``fn(*args)`` over the leading dimension in sequential equal chunks of at most about ``cap``
  rows, each a multiple of ``multiple``; all rows at once when ``cap`` is None or not smaller than
  the row count (then exactly ``fn(*args)``)."""
  rows = args[0].shape[0]
  if cap is None or rows <= cap:
    return fn(*args)
  k = -(-rows // cap)
  chunk = -(-(-(-rows // k)) // multiple) * multiple
  return layers.map_rows(fn, args, chunk)


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


def make_sample_fn(model: MMSR, conditioner: Conditioner, schedule: diffusion.Schedule,
                         grid: TileGrid, *, steps: int, guidance: str = "mcfg",
                         spacing: str = "leading", clip_x0: float = 0.0, strength: float = 1.0,
                         mesh=None, progress: Callable[[], None] | None = None,
                         tile_batch: int | None = None, map_batch: int | None = None):
  """Returns ``sample(params, frozen, inputs, rng, scale, eta) -> images [B, H, W, 3]`` in [-1, 1].

  The whole sampler in one ``jax.jit``: LR encode, VQ ids and MMLC context of every tile (once),
  DDIM with both guidance branches in one batch, decode. An output that fits one tile (``grid``
  of one tile, the training size) is the plain untiled sampler: its blend weight is exactly 1.

  ``inputs`` (see :func:`make_inputs`): ``lr [B, h, w, 3]`` the whole (padded) LR images;
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
  t_first = int(diffusion.sampling_timesteps(schedule.num_timesteps, steps, spacing,
                                             strength)[0])
  from_lr = strength < 1.0
  guided = guidance_lib.check(guidance) != "none"
  weights = grid.weights()
  n = grid.num_tiles
  shards = num_shards(mesh)
  split = ((lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)))
           if mesh is not None and shards > 1 else (lambda x: x))

  @jax.jit
  def sample(params, frozen, inputs, rng, scale, eta):
    if mesh is None:
      return sample_body(params, frozen, inputs, rng, scale, eta)
    # The mesh's rules while tracing: the denoiser's activations stay split like its rows, and
    # a Pallas kernel (flash attention) runs per device in a shard_map.
    with sharding.activation_rules(mesh):
      return sample_body(params, frozen, inputs, rng, scale, eta)

  def sample_body(params, frozen, inputs, rng, scale, eta):
    lr = inputs["lr"]
    b, h, w, _ = lr.shape
    out_hw = (h * conditioner.scale, w * conditioner.scale)
    upsample_lr = ae_lib.upsample_bicubic(lr, *out_hw)
    lr_latent = _encode(conditioner, frozen, upsample_lr)
    if lr_latent.shape[1:3] != grid.latent_hw:
      raise ValueError(f"LR {h}x{w} gives a {lr_latent.shape[1:3]} latent; the tile grid was "
                       f"made for {grid.latent_hw}")
    # --- Context per tile (both guidance branches), computed once.
    states, mask, ids, present, temperature = _context_rows(
        conditioner, frozen, inputs, guidance if guided else "none", n, map_batch)
    rows = states.shape[0]
    padded = -(-rows // shards) * shards
    ctx = model.apply({"params": params}, *(split(layers.pad_rows(a, padded)) for a in
                                            (states, mask, ids, present, temperature)),
                      method=MMSR.encode_context)
    lr_tiles = grid.gather(lr_latent)
    lr_rows = split(layers.pad_rows(
        jnp.concatenate([lr_tiles, lr_tiles]) if guided else lr_tiles, padded))
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
      out = _chunked(dit, (layers.pad_rows(zt, padded), layers.pad_rows(tt, padded), lr_rows,
                           ctx), tile_batch, shards)[:rows]
      if guided:
        half = rows // 2
        out = guidance_lib.combine(out[:half], out[half:], scale)
      return grid.blend(out, wts)

    lat_shape = (b, *grid.latent_hw, conditioner.autoencoder.latent_channels)
    r_init, r_loop = jax.random.split(rng)
    z_init = jax.random.normal(r_init, lat_shape)
    if from_lr:  # as the untiled sampler: the diffusion variable of an HR equal to the upsampled LR
      # (encoding it again would give lr_latent itself, so its residual is exactly zero)
      x0_lr = jnp.zeros_like(lr_latent) if conditioner.residual else lr_latent
      z_init = schedule.add_noise(x0_lr, z_init, jnp.full((b,), t_first))
    z = diffusion.ddim_sample(
        schedule, denoise, z_init, r_loop, steps=steps, eta=eta, scale=scale, guided=False,
        spacing=spacing, clip_x0=clip_x0 or None, strength=strength)
    return jnp.clip(_decode_sample(conditioner, frozen, z, lr_latent), -1.0, 1.0)

  return sample


def _text_states(conditioner: Conditioner, frozen, inputs: dict, guidance: str, present):
  """Text states and masks of the positive rows ``[B, ...]`` and of the negative branch's (empty
  without guidance): given beforehand in ``inputs['states']``, or encoded here from the ids."""
  b = inputs["lr"].shape[0]
  if "states" in inputs:
    states, mask = inputs["states"], inputs["states_mask"]
    return states[:b], mask[:b], states[b:], mask[b:]
  text = (inputs["text_ids"], inputs["text_mask"])
  if guidance != "none":
    (n_ids, n_mask), _ = guidance_lib.negative_branch(
        guidance, text, (inputs["neg_ids"], inputs["neg_mask"]),
        (inputs["null_ids"], inputs["null_mask"]), present)
    text = (jnp.concatenate([text[0], n_ids]), jnp.concatenate([text[1], n_mask]))
  all_states = conditioner.text_states(frozen, *text)
  return all_states[:b], text[1][:b], all_states[b:], text[1][b:]


def _context_rows(conditioner: Conditioner, frozen, inputs: dict, guidance: str, n: int,
                  map_batch: int | None):
  """What the context encoder takes for every tile of every image (``n`` tiles per image), the
  positive rows first, then with guidance the negative branch's: text states and masks, the
  maps' VQ ids, presence and temperatures."""
  ids = _chunked(lambda m: conditioner.modality_ids(frozen, m), (inputs["maps"],), map_batch)
  present = inputs["present"].astype(bool)
  per_tile = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  per image -> per tile
  temperature = per_tile(inputs["temperature"])
  pos_states, pos_mask, neg_states, neg_mask = _text_states(conditioner, frozen, inputs,
                                                            guidance, present)
  pos_states, pos_mask = per_tile(pos_states), per_tile(pos_mask)
  if guidance == "none":
    return pos_states, pos_mask, ids, present, temperature
  _, n_present = guidance_lib.negative_branch(guidance, None, None, None, present)
  states = jnp.concatenate([pos_states, per_tile(neg_states)])
  mask = jnp.concatenate([pos_mask, per_tile(neg_mask)])
  present, ids = jnp.concatenate([present, n_present]), jnp.concatenate([ids, ids])
  return states, mask, ids, present, jnp.concatenate([temperature, temperature])


def default_temperature(batch: int, overrides: dict[str, float] | None = None):
  """``[B, 4]`` temperatures: 1 everywhere except the named groups."""
  values = [1.0] * len(CONTEXT_GROUPS)
  for name, value in (overrides or {}).items():
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"temperature for {name!r}: expected one of {CONTEXT_GROUPS}")
    if not value > 0:
      raise ValueError(f"temperature {name}={value}: must be > 0")
    values[CONTEXT_GROUPS.index(name)] = float(value)
  return jnp.tile(jnp.asarray(values, jnp.float32)[None], (batch, 1))


def make_inputs(examples: list[dict], tokenizer, config, *, lr_images: np.ndarray | None = None,
                num_tiles: int = 1, negative_prompt: str | None = None,
                temperature: dict[str, float] | None = None,
                enabled: dict[str, bool] | None = None) -> dict:
  """Sampler inputs from per-tile condition examples (image-major, ``num_tiles`` per image; maps,
  ``present``, caption ids) and the whole LR images ``lr_images [B, h, w, 3]`` in [-1, 1] (by
  default the examples' own ``lr``, one tile each), adding the negative / empty caption ids,
  temperatures and modality switches.

  ``enabled`` switches groups off (``{"depth": False}`` -> the depth null block; ``{"text":
  False}`` -> the empty caption).
  """
  b, length = len(examples), config.text.max_length
  neg = tokenizer.encode(config.sampling.negative_prompt if negative_prompt is None
                         else negative_prompt, length)
  null = tokenizer.encode("", length)
  enabled = dict(enabled or {})
  for name in enabled:
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"modality switch {name!r}: expected one of {CONTEXT_GROUPS}")
  stack = lambda key: np.stack([np.asarray(e[key]) for e in examples])  # noqa: E731
  text_ids, text_mask = stack("text_ids"), stack("text_mask")
  if not enabled.get("text", True):
    text_ids, text_mask = np.tile(null[0], (b, 1)), np.tile(null[1], (b, 1))
  switch = np.asarray([enabled.get(m, True) for m in MODALITIES])
  per_image = slice(None, None, num_tiles)
  inputs = {
      "lr": stack("lr").astype(np.float32) if lr_images is None else np.asarray(lr_images,
                                                                             np.float32),
      "text_ids": text_ids, "text_mask": text_mask,
      "neg_ids": np.tile(neg[0], (b, 1)), "neg_mask": np.tile(neg[1], (b, 1)),
      "null_ids": np.tile(null[0], (b, 1)), "null_mask": np.tile(null[1], (b, 1)),
      "maps": np.stack([stack(m) for m in MODALITIES], axis=1),
      "present": stack("present").astype(bool) & switch[None],
      "temperature": np.asarray(default_temperature(b, temperature)),
  }
  for key in ("text_ids", "text_mask", "neg_ids", "neg_mask", "null_ids", "null_mask",
              "temperature"):
    inputs[key] = inputs[key][per_image]
  return inputs
