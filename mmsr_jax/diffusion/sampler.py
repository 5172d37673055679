"""The super-resolution sampler: conditions -> guided DDIM -> decoded image, in one ``jax.jit``.

The caller gives an LR batch, caption ids (positive, negative, and the empty caption), rendered
modality maps with their presence flags, and per-group temperatures; everything that may change
between calls without changing shapes (guidance scale, eta, temperatures, switches, seed) is a
traced argument, so changing it does not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.models import autoencoder as ae_lib
from mmsr_jax.models import context as context_lib
from mmsr_jax.models.mmsr import MMSR, Conditioner


def negative_branch(guidance: str, pos_text, neg_text, null_text, present):
  """The negative branch's (text, present) for a guidance mode (see :mod:`mmsr_jax.diffusion`)."""
  if guidance == "cfg":
    return null_text, jnp.zeros_like(present)
  if guidance == "m0cfg":
    return neg_text, jnp.zeros_like(present)
  if guidance == "mcfg":
    return neg_text, present
  raise ValueError(f"guidance={guidance!r}: expected one of {diffusion.GUIDANCE_MODES} or 'none'")


def make_sample_fn(model: MMSR, conditioner: Conditioner, schedule: diffusion.Schedule, *,
                   steps: int, guidance: str = "mcfg", spacing: str = "leading",
                   clip_x0: float = 0.0, strength: float = 1.0):
  """Returns ``sample(params, frozen, inputs, rng, scale, eta) -> SR images in [-1, 1]``.

  ``inputs`` holds ``lr [B,h,w,3]``, ``text_ids/text_mask``, ``neg_ids/neg_mask``,
  ``null_ids/null_mask`` (``[B, L]``), ``maps [B,3,M,M,3]``, ``present [B,3]`` and
  ``temperature [B,4]`` (text, depth, seg, edge). ``guidance='none'`` runs the conditional branch
  alone (no negative forward pass). ``strength < 1`` starts from the LR image's own diffusion
  variable noised to the timestep ``strength * T`` (SDEdit-style initialisation) instead of
  pure noise: fewer invented details, closer fidelity to the input.
  """
  first = diffusion.start_step(steps, strength)
  t_first = int(diffusion.ddim_timesteps(schedule.num_timesteps, steps, spacing)[first])
  guided = guidance != "none"
  if guided and guidance not in diffusion.GUIDANCE_MODES:
    raise ValueError(f"guidance={guidance!r}: expected one of {diffusion.GUIDANCE_MODES} or 'none'")

  @jax.jit
  def sample(params, frozen, inputs, rng, scale, eta):
    lr = inputs["lr"]
    b, h, w, _ = lr.shape
    out_hw = (h * conditioner.scale, w * conditioner.scale)
    upsample_lr = ae_lib.upsample_bicubic(lr, *out_hw)
    lr_latent = conditioner.encode_image(frozen, upsample_lr)
    ids = conditioner.modality_ids(frozen, inputs["maps"])
    present = inputs["present"].astype(bool)
    pos = (inputs["text_ids"], inputs["text_mask"])
    if guided:
      (n_ids, n_mask), n_present = negative_branch(
          guidance, pos, (inputs["neg_ids"], inputs["neg_mask"]),
          (inputs["null_ids"], inputs["null_mask"]), present)
      text_ids = jnp.concatenate([pos[0], n_ids])
      text_mask = jnp.concatenate([pos[1], n_mask])
      present = jnp.concatenate([present, n_present])
      ids = jnp.concatenate([ids, ids])
      temperature = jnp.concatenate([inputs["temperature"]] * 2)
      lr_latent = jnp.concatenate([lr_latent, lr_latent])
    else:
      text_ids, text_mask = pos
      temperature = inputs["temperature"]
    states = conditioner.text_states(frozen, text_ids, text_mask)
    ctx = model.apply({"params": params}, states, text_mask, ids, present, temperature,
                      method=MMSR.encode_context)
    denoise = functools.partial(_denoise, model, params, lr_latent, ctx)
    lat_shape = (b, out_hw[0] // conditioner.autoencoder.downsample,
                 out_hw[1] // conditioner.autoencoder.downsample,
                 conditioner.autoencoder.latent_channels)
    r_init, r_loop = jax.random.split(rng)
    z_init = jax.random.normal(r_init, lat_shape)
    if first:  # the diffusion variable an HR image equal to the upsampled LR would have
      x0_lr = conditioner.diffusion_target(frozen, upsample_lr, lr_latent[:b])
      z_init = schedule.add_noise(x0_lr, z_init, jnp.full((b,), t_first))
    z = diffusion.ddim_sample(
        schedule, denoise, z_init, r_loop, steps=steps, eta=eta, scale=scale, guided=guided,
        spacing=spacing, clip_x0=clip_x0 or None, first_step=first)
    return jnp.clip(conditioner.decode_sample(frozen, z, lr_latent[:b]), -1.0, 1.0)

  return sample


def _denoise(model, params, lr_latent, ctx, z, t):
  return model.apply({"params": params}, z, t, lr_latent, ctx, method=MMSR.denoise)


def default_temperature(batch: int, overrides: dict[str, float] | None = None):
  """``[B, 4]`` temperatures: 1 everywhere except the named groups."""
  values = [1.0] * len(context_lib.CONTEXT_GROUPS)
  for name, value in (overrides or {}).items():
    if name not in context_lib.CONTEXT_GROUPS:
      raise ValueError(f"temperature for {name!r}: expected one of {context_lib.CONTEXT_GROUPS}")
    if not value > 0:
      raise ValueError(f"temperature {name}={value}: must be > 0")
    values[context_lib.CONTEXT_GROUPS.index(name)] = float(value)
  return jnp.tile(jnp.asarray(values, jnp.float32)[None], (batch, 1))


def make_inputs(examples: list[dict], tokenizer, config, *, negative_prompt: str | None = None,
                temperature: dict[str, float] | None = None,
                enabled: dict[str, bool] | None = None) -> dict:
  """Stacks example dicts (``lr``, ``text_ids``, ``text_mask``, maps, ``present``) into sampler
  inputs, adding the negative / empty caption ids, temperatures and modality switches.

  ``enabled`` switches groups off (``{"depth": False}`` -> the depth null block; ``{"text":
  False}`` -> the empty caption).
  """
  b, length = len(examples), config.text.max_length
  neg = tokenizer.encode(config.sampling.negative_prompt if negative_prompt is None
                         else negative_prompt, length)
  null = tokenizer.encode("", length)
  enabled = dict(enabled or {})
  for name in enabled:
    if name not in context_lib.CONTEXT_GROUPS:
      raise ValueError(f"modality switch {name!r}: expected one of {context_lib.CONTEXT_GROUPS}")
  stack = lambda key: np.stack([np.asarray(e[key]) for e in examples])  # noqa: E731
  text_ids, text_mask = stack("text_ids"), stack("text_mask")
  if not enabled.get("text", True):
    text_ids, text_mask = np.tile(null[0], (b, 1)), np.tile(null[1], (b, 1))
  switch = np.asarray([enabled.get(m, True) for m in context_lib.SPATIAL_MODALITIES])
  return {
      "lr": stack("lr").astype(np.float32),
      "text_ids": text_ids, "text_mask": text_mask,
      "neg_ids": np.tile(neg[0], (b, 1)), "neg_mask": np.tile(neg[1], (b, 1)),
      "null_ids": np.tile(null[0], (b, 1)), "null_mask": np.tile(null[1], (b, 1)),
      "maps": np.stack([stack(m) for m in context_lib.SPATIAL_MODALITIES], axis=1),
      "present": stack("present").astype(bool) & switch[None],
      "temperature": np.asarray(default_temperature(b, temperature)),
  }
