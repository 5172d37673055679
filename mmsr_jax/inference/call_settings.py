"""The settings of one super-resolution call: the run's ``config.sampling`` defaults filled in and
every value checked before any image work.
"""

from __future__ import annotations

import math
from typing import Any

from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.formats.records import CONTEXT_GROUPS
from mmsr_jax.inference.work_limits import lr_multiple

# Settings a call may change; None = the run's config.sampling value.
SETTINGS = ("guidance", "scale", "steps", "eta", "seed", "strength", "negative_prompt")


def resolve_settings(config, num_timesteps: int, *,
                     temperature: dict[str, float] | None = None,
                     enabled: dict[str, bool] | None = None, tile: int | None = None,
                     tile_overlap: int | None = None, tile_batch: int | None = None,
                     map_batch: int | None = None, bucket: int | None = None,
                     **settings) -> dict[str, Any]:
  """The effective settings of a call (the run's defaults filled in), checked: every value
  that can be wrong is rejected here, before any image work.

  ``bucket`` (LR pixels, rounded up to a multiple of ``lr_multiple(config)``): pad the LR sides
  to a multiple of it instead of the model's own multiple and crop the result back, so that
  inputs of nearby sizes share one padded size and so one compiled sampler (the web demo's
  shape buckets). None: the model's multiple, the least padding."""
  unknown = set(settings) - set(SETTINGS)
  if unknown:
    raise ValueError(f"unknown setting(s) {sorted(unknown)}; expected {SETTINGS}")
  sc = config.sampling
  out = {k: (sc[k] if settings.get(k) is None else settings[k]) for k in SETTINGS}
  guidance_lib.check(out["guidance"], allow_none=False)
  out["steps"], out["seed"] = int(out["steps"]), int(out["seed"])
  out["scale"], out["eta"], out["strength"] = (float(out[k]) for k in ("scale", "eta",
                                                                        "strength"))
  if not (math.isfinite(out["scale"]) and out["scale"] >= 0):
    raise ValueError(f"scale={out['scale']}: expected a finite value >= 0")
  if not 0.0 <= out["eta"] <= 1.0:
    raise ValueError(f"eta={out['eta']}: expected a value in [0, 1]")
  diffusion.ddim_timesteps(num_timesteps, out["steps"], config.sampling.spacing)  # checks steps
  diffusion.check_strength(out["strength"])
  temps = {g: 1.0 for g in CONTEXT_GROUPS}
  for name, value in (temperature or {}).items():
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"temperature for {name!r}: expected one of {CONTEXT_GROUPS}")
    if not (math.isfinite(float(value)) and float(value) > 0):
      raise ValueError(f"temperature {name}={value}: must be a finite value > 0")
    temps[name] = float(value)
  on = {g: True for g in CONTEXT_GROUPS}
  for name, value in (enabled or {}).items():
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"modality switch {name!r}: expected one of {CONTEXT_GROUPS}")
    on[name] = bool(value)
  # Validates the tile geometry on a one-tile image.
  m = lr_multiple(config)
  grid = sampler.make_grid(config, (m, m), tile=tile, overlap=tile_overlap)
  for name, value in (("tile_batch", tile_batch), ("map_batch", map_batch)):
    if value is not None and int(value) < 1:
      raise ValueError(f"{name}={value}: expected a positive number (or None: no limit)")
  if bucket is not None and int(bucket) < 1:
    raise ValueError(f"bucket={bucket}: expected a positive number of LR pixels (or None)")
  out.update(temperature=temps, enabled=on, tile=grid.tile, tile_overlap=grid.overlap,
             tile_batch=None if tile_batch is None else int(tile_batch),
             map_batch=None if map_batch is None else int(map_batch),
             bucket=m if bucket is None else -(-int(bucket) // m) * m)
  return out
