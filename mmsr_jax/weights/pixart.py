"""PixArt-alpha / Sigma transformers (diffusers) as MMSR's DiT: key mapping, and the grafting that
widens the patch embedding for the LR latent with zero-initialised channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.formats import param_layout as layout
from mmsr_jax.models import layers
from mmsr_jax.weights import torch_import
from mmsr_jax.models.dit import DiT

# Flax sub-module name -> diffusers sub-module name, inside one transformer block.
_BLOCK_NAMES = {"fc1": "net.0.proj", "fc2": "net.2", "to_out": "to_out.0"}
_TOP_NAMES = {
    "patch_embed": "pos_embed.proj",
    "adaln_single": "adaln_single.linear",
    "timestep_embedder": "adaln_single.emb.timestep_embedder",
    "caption_projection_1": "caption_projection.linear_1",
    "caption_projection_2": "caption_projection.linear_2",
}


class CaptionProjection(nn.Module):
  """PixArt caption projection ``Linear -> GELU(tanh) -> Linear``.

  Same parameter names and maths as the text branch of ``MultimodalContext``
  (``caption_projection_1/2``), so the converted parameters fit either.
  """

  width: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    x = layers.dense(self.width, (None, "embed"), name="caption_projection_1",
                     dtype=self.dtype)(text.astype(self.dtype))
    x = nn.gelu(x, approximate=True)
    return layers.dense(self.width, ("embed", "embed_out"), name="caption_projection_2",
                        dtype=self.dtype)(x)


def _torch_key(path: tuple[str, ...]) -> str:
  """The diffusers state-dict key of a Flax parameter path."""
  *mods, leaf = path
  parts = []
  for m in mods:
    if m.startswith("blocks_"):
      parts.append(f"transformer_blocks.{m[len('blocks_'):]}")
    elif m in _TOP_NAMES and not parts:
      parts.append(_TOP_NAMES[m])
    else:
      parts.append(_BLOCK_NAMES.get(m, m))
  if leaf == "scale_shift_table":
    parts.append(leaf)
  else:
    parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _to_flax(path: tuple[str, ...], arr: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
  """Reorders a torch tensor into the Flax layout."""
  if path[-1] == "kernel" and arr.ndim == 4 and len(expected) == 4:
    return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path[-1] == "kernel" and arr.ndim == 2:
    return arr.T  # (out, in) -> (in, out)
  return arr


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
  if key not in sd:
    raise ValueError(f"PixArt state dict has no '{key}' (needed to infer the architecture).")
  return tuple(np.shape(sd[key]))


def pixart_params_from_torch_state_dict(
    state_dict: Mapping[str, Any], *, depth: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Converts a diffusers ``PixArtTransformer2DModel`` state dict.

  The widths (model width, MLP hidden, patch size, in/out channels, caption channels) are read
  from the state dict; ``depth`` is the number of transformer blocks expected (a different count
  shows up as missing or unexpected keys). Attention heads do not change parameter shapes: pass
  the checkpoint's ``num_attention_heads`` to ``DiT``. Learned-sigma checkpoints simply have
  ``out_channels = 2 * in_channels``.

  Args:
    state_dict: torch key -> array (numpy, or anything ``np.asarray`` takes), e.g. from
      ``safetensors.numpy.load_file`` or ``{k: v.numpy() for k, v in model.state_dict().items()}``.
    depth: number of transformer blocks.

  Returns:
    ``(dit_variables, caption_variables)``, each ``{"params": tree}`` of float32 numpy arrays:
    the first for ``DiT(...).apply``, the second for ``CaptionProjection(width).apply`` (the same
    tree fits ``MultimodalContext``'s ``caption_projection_1/2``), or ``None`` when the checkpoint
    has no caption projection.

  Raises:
    ValueError: on a shape mismatch (naming the key and both shapes) or on missing / unexpected
      keys (listing them).
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  sd.pop("pos_embed.pos_embed", None)  # a fixed buffer; recomputed by ``layers.sincos_2d``
  width, in_channels, p, _ = _shape(sd, "pos_embed.proj.weight")
  out_features = _shape(sd, "proj_out.weight")[0]
  if out_features % (p * p):
    raise ValueError(f"'proj_out.weight' has {out_features} outputs, not a multiple of "
                     f"patch_size**2 = {p * p}.")
  hidden = _shape(sd, "transformer_blocks.0.ff.net.0.proj.weight")[0] if depth else 4 * width
  dit = DiT(out_channels=out_features // (p * p), width=width, depth=depth, num_heads=1,
            patch_size=p, mlp_ratio=hidden / width)
  cap_keys = {k for k in sd if k.startswith("caption_projection.")}
  context_len = 1
  dit_shapes = jax.eval_shape(
      dit.init, jax.random.PRNGKey(0), jnp.zeros((1, p, p, in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, context_len, width)))
  dit_vars = torch_import.convert_state_dict(
      {k: v for k, v in sd.items() if k not in cap_keys}, nn.unbox(dit_shapes["params"]),
      torch_key=_torch_key, to_flax=_to_flax, model_name="PixArt DiT")
  if not cap_keys:
    return dit_vars, None
  caption_channels = _shape(sd, "caption_projection.linear_1.weight")[1]
  cap_shapes = jax.eval_shape(CaptionProjection(width).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 1, caption_channels)))
  cap_vars = torch_import.convert_state_dict(
      {k: sd[k] for k in cap_keys}, nn.unbox(cap_shapes["params"]), torch_key=_torch_key,
      to_flax=_to_flax, model_name="PixArt caption projection")
  return dit_vars, cap_vars


def widen_patch_embed(dit_params: dict[str, Any], extra_in_channels: int) -> dict[str, Any]:
  """Appends ``extra_in_channels`` zero input channels to the patch-embedding kernel.

  The widened model on ``concat([x, anything], -1)`` computes exactly what the original model
  computes on ``x``; training then learns to use the new channels (e.g. the LR latent).

  Args:
    dit_params: ``{"params": tree}`` or a bare params tree of a ``DiT``.
    extra_in_channels: number of input channels to add (>= 0).

  Returns:
    A new tree of the same form; only ``patch_embed/kernel`` changes (``[p, p, C + extra, D]``).
  """
  if extra_in_channels < 0:
    raise ValueError(f"extra_in_channels must be >= 0, got {extra_in_channels}")
  wrapped = "params" in dit_params
  params = dict(dit_params["params"] if wrapped else dit_params)
  embed = dict(params["patch_embed"])
  kernel = embed["kernel"]
  boxed = isinstance(kernel, nn.meta.AxisMetadata)  # e.g. LogicallyPartitioned from ``init``
  value = kernel.unbox() if boxed else kernel
  pad = [(0, 0), (0, 0), (0, extra_in_channels), (0, 0)]
  value = np.pad(value, pad) if isinstance(value, np.ndarray) else jnp.pad(value, pad)
  embed["kernel"] = kernel.replace_boxed(value) if boxed else value
  params["patch_embed"] = embed
  return {**dit_params, "params": params} if wrapped else params


def take_output_channels(dit_params: dict[str, Any], out_channels: int) -> dict[str, Any]:
  """Keeps the first ``out_channels`` of each output pixel of ``proj_out``.

  PixArt checkpoints predict ``2 * C`` channels per pixel (noise, then the learned variance);
  MMSR predicts only the noise, so the variance half is dropped. ``proj_out``'s outputs are laid
  out ``(p, p, C)`` per token (see ``DiT``'s unpatchify), so the cut is on the last axis of that.
  """
  wrapped = "params" in dit_params
  params = dict(dit_params["params"] if wrapped else dit_params)
  proj = dict(params["proj_out"])
  kernel, bias = np.asarray(proj["kernel"]), np.asarray(proj["bias"])
  width, features = kernel.shape
  p2 = params["patch_embed"]["kernel"].shape[0] * params["patch_embed"]["kernel"].shape[1]
  have = features // p2
  if out_channels > have:
    raise ValueError(f"proj_out has {have} output channels per pixel, cannot take {out_channels}")
  proj["kernel"] = kernel.reshape(width, p2, have)[:, :, :out_channels].reshape(width, -1)
  proj["bias"] = bias.reshape(p2, have)[:, :out_channels].reshape(-1)
  params["proj_out"] = proj
  return {**dit_params, "params": params} if wrapped else params


def pixart_for_mmsr(path: str, abstract_params: dict[str, Any], *, num_heads: int,
                    field: str = "config.model.init_from") -> dict[str, Any]:
  """Reads weights written by ``python -m mmsr_jax.convert --kind=pixart`` for an MMSR model.

  The PixArt DiT becomes MMSR's ``dit`` (patch embedding widened with zero channels for the LR
  latent, learned-variance outputs dropped) and its caption projection MMSR's text projection in
  ``context``. Everything else of MMSR (the modality embeddings, the MMLC) keeps its fresh
  initialisation. Returns ``{"dit": ..., "context": {"caption_projection_1": ..., ...}}`` as
  numpy arrays, checked against ``abstract_params`` (MMSR's unboxed params) key by key.
  """
  from flax import traverse_util

  from mmsr_jax.weights import params_io
  file = params_io.params_file(path)
  info_path = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info.get("kind") not in (None, "pixart"):
      raise ValueError(f"{field}={path!r} holds converted '{info['kind']}' weights, not pixart")
    heads = info.get("arch", {}).get("num_heads")
    if heads is not None and heads != num_heads:
      raise ValueError(f"{field}={path!r} was converted from a DiT with {heads} attention heads "
                       f"but config.model.num_heads={num_heads}")
  flat = params_io.read_safetensors(file)
  if layout.is_per_layer(flat):
    flat = layout.stack_layers(flat)  # converted before the layers were scanned
  tree = traverse_util.unflatten_dict(flat, sep="/")
  if "dit" not in tree:
    raise ValueError(f"{field}={path!r}: no 'dit/...' keys; write it with "
                     "python -m mmsr_jax.convert --kind=pixart")
  want_dit = abstract_params["dit"]
  dit = tree["dit"]
  have_in = dit["patch_embed"]["kernel"].shape[2]
  want_in = want_dit["patch_embed"]["kernel"].shape[2]
  if want_in < have_in:
    raise ValueError(f"{field}={path!r}: the checkpoint's patch embedding takes {have_in} "
                     f"channels, more than MMSR's {want_in}")
  dit = widen_patch_embed(dit, want_in - have_in)
  want_out = want_dit["proj_out"]["bias"].shape[0] // (want_dit["patch_embed"]["kernel"].shape[0]
                                                        * want_dit["patch_embed"]["kernel"].shape[1])
  dit = take_output_channels(dit, want_out)
  out = {"dit": dit}
  if "context" in tree:
    out["context"] = {k: tree["context"][k] for k in ("caption_projection_1",
                                                      "caption_projection_2")}
  want = traverse_util.flatten_dict({k: abstract_params[k] if k == "dit" else
                                     {n: abstract_params[k][n] for n in out[k]}
                                     for k in out}, sep="/")
  got = traverse_util.flatten_dict(out, sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{field}={path!r} does not fit config.model (depth / names): missing "
                     f"{missing[:4]}, unexpected {extra[:4]}")
  for key, spec in want.items():
    if tuple(got[key].shape) != tuple(spec.shape):
      raise ValueError(f"{field}={path!r}: key {key!r} has shape {tuple(got[key].shape)} but the "
                       f"model expects {tuple(spec.shape)} (check config.model.width / "
                       "config.text.encoder.d_model against the converted PixArt)")
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in got.items()},
                                      sep="/")


# ---------------------------------------------------------------------------------------------
# What a converted PixArt was trained with: position-embedding scale and noise schedule.
# ---------------------------------------------------------------------------------------------
# PixArt-alpha and -Sigma train with IDDPM's linear betas (1e-4 -> 0.02 over 1000 steps) and
# predict epsilon (plus a learned variance, dropped here); their diffusers pipelines ship it as
# scheduler/scheduler_config.json. Used when a source has no scheduler config.
DEFAULT_SCHEDULE = {"schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                    "num_timesteps": 1000, "prediction": "epsilon", "rescale_zero_snr": False}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}
# The fields of config.diffusion that fix the noise level at each t: a start from a prior
# trained on other values sees, at every t, a noise level it never learned.
SCHEDULE_FIELDS = ("schedule", "beta_start", "beta_end", "num_timesteps", "rescale_zero_snr")


def interpolation_scale(cfg: dict) -> float:
  """diffusers' ``interpolation_scale`` of a ``PixArtTransformer2DModel`` config (its default,
  ``max(sample_size // 64, 1)``, when the config leaves it unset: 2 for the 1024px models)."""
  value = cfg.get("interpolation_scale")
  if value is None:
    value = max(int(cfg.get("sample_size", 128)) // 64, 1)
  if not float(value) > 0:
    raise ValueError(f"--kind=pixart: interpolation_scale={value!r} in the source config.json; "
                     "expected a positive number")
  return float(value)


def training_schedule(scheduler_cfg: dict | None, where: str = "") -> dict:
  """The noise schedule (``config.diffusion`` field values) a diffusers scheduler config
  describes; :data:`DEFAULT_SCHEDULE` when there is none (``source`` says which)."""
  if scheduler_cfg is None:
    return dict(DEFAULT_SCHEDULE, source="PixArt default (no scheduler config found)")
  name = scheduler_cfg.get("beta_schedule", "linear")
  if scheduler_cfg.get("trained_betas") is not None or name not in _BETA_SCHEDULES:
    raise ValueError(f"{where}: beta_schedule={name!r} (or trained_betas) is not one this "
                     f"project can train with ({', '.join(_BETA_SCHEDULES)})")
  pred = scheduler_cfg.get("prediction_type", "epsilon")
  if pred not in _PREDICTIONS:
    raise ValueError(f"{where}: prediction_type={pred!r}; expected one of {tuple(_PREDICTIONS)}")
  return {"schedule": _BETA_SCHEDULES[name],
          "beta_start": float(scheduler_cfg.get("beta_start", 1e-4)),
          "beta_end": float(scheduler_cfg.get("beta_end", 0.02)),
          "num_timesteps": int(scheduler_cfg.get("num_train_timesteps", 1000)),
          "prediction": _PREDICTIONS[pred],
          "rescale_zero_snr": bool(scheduler_cfg.get("rescale_betas_zero_snr", False)),
          "source": where}


def check_training_schedule(info: dict, diffusion_cfg, *, field: str = "config.model.init_from",
                            path: str = "") -> list[str]:
  """Compares ``config.diffusion`` with the schedule a converted PixArt folder records.

  A different noise schedule (betas, timesteps, zero-SNR rescaling) is refused with one
  ValueError; a different prediction type is allowed (a deliberate fine-tuning choice) and
  returned as a warning line. Folders converted before the schedule was recorded are PixArt's
  default schedule.
  """
  recorded = info.get("training_schedule") or dict(
      DEFAULT_SCHEDULE, source="PixArt default (the converted folder records none)")
  diffs = []
  for key in SCHEDULE_FIELDS:
    want, have = recorded[key], diffusion_cfg.get(key)
    same = (abs(float(want) - float(have)) <= 1e-9 * max(1.0, abs(float(want)))
            if isinstance(want, float) else want == have)
    if not same:
      diffs.append(f"config.diffusion.{key}={have!r} (trained with {want!r})")
  if diffs:
    flags = " ".join(f"--config.diffusion.{k}={recorded[k]}" for k in SCHEDULE_FIELDS)
    raise ValueError(
        f"{field}={path!r} was trained with another noise schedule than this config's: "
        f"{'; '.join(diffs)} [{recorded.get('source', '')}]. At every t the prior would see a "
        f"noise level it never learned; set {flags}")
  warnings = []
  if recorded["prediction"] != diffusion_cfg.get("prediction"):
    warnings.append(
        f"{field}={path!r} predicts {recorded['prediction']!r} but config.diffusion.prediction="
        f"{diffusion_cfg.get('prediction')!r}: its output layer starts on another target and "
        "must be re-learned")
  return warnings


def check_converted(path: str, config, *, field: str = "config.model.init_from") -> list[str]:
  """Checks a run's config against what a converted PixArt folder records, before any weights
  are read: the noise schedule (:func:`check_training_schedule`) and the position-embedding
  ``interpolation_scale`` (``config.model.pos_interpolation_scale``). Returns warning lines."""
  from mmsr_jax.weights import params_io
  file = params_io.params_file(path)
  info_path = os.path.join(os.path.dirname(os.path.abspath(file)), "config.json")
  info = {}
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
  recorded = info.get("arch", {}).get("interpolation_scale")
  have = float(config.model.get("pos_interpolation_scale", 1.0))
  if recorded is not None and abs(float(recorded) - have) > 1e-9:
    raise ValueError(f"{field}={path!r} was trained with position interpolation_scale="
                     f"{recorded:g} but config.model.pos_interpolation_scale={have:g}; set "
                     f"--config.model.pos_interpolation_scale={recorded:g}")
  return check_training_schedule(info, config.diffusion, field=field, path=path)
