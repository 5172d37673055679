"""MMSR's three guidance modes: what the negative branch sees, and how the branches combine.

``eps = (1 + w) eps(z, c, pos, m) - w eps(z, c, NEG)`` with ``cfg``: NEG = (empty caption, null
modalities), ``m0cfg``: (negative prompt, null modalities), ``mcfg``: (negative prompt, m): the
modalities stay in both branches. ``none`` runs the conditional branch alone.
"""

from __future__ import annotations

import jax.numpy as jnp

from mmsr_jax.schema.choices import GUIDANCE_MODES


def check(guidance: str, *, allow_none: bool = True) -> str:
  """The one validator of a guidance mode name."""
  options = GUIDANCE_MODES + (("none",) if allow_none else ())
  if guidance not in options:
    raise ValueError(f"guidance={guidance!r}: expected one of {options}")
  return guidance


def negative_branch(guidance: str, pos_text, neg_text, null_text, present):
  """The negative branch's (text, present) for a guidance mode."""
  check(guidance, allow_none=False)
  if guidance == "cfg":
    return null_text, jnp.zeros_like(present)
  if guidance == "m0cfg":
    return neg_text, jnp.zeros_like(present)
  return neg_text, present


def combine(model_out_pos, model_out_neg, scale):
  """``(1 + w) pos - w neg``; with ``w = 0`` the plain conditional prediction."""
  return (1.0 + scale) * model_out_pos - scale * model_out_neg


def describe_negative(guidance: str, negative_prompt: str) -> dict:
  """What a mode's negative branch is given, for reports and sidecars (``None`` values: no
  negative branch, i.e. ``none`` or a scale of 0)."""
  check(guidance)
  if guidance == "none":
    return {"caption": None, "modalities": None}
  if guidance == "cfg":
    return {"caption": "", "modalities": "null"}
  return {"caption": negative_prompt,
          "modalities": "null" if guidance == "m0cfg" else "as the positive branch"}
