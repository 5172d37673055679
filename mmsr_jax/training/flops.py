"""Model FLOPs of the trainable MMSR counted from the config (forward x 3), and dense bf16 peaks of
common accelerators, for MFU.
"""

from __future__ import annotations

import jax

from mmsr_jax.models import build

# Dense bf16 peak FLOP/s per device (per chip on TPU), by a substring of ``device_kind``; the
# first match wins, so the more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device=None) -> float | None:
  """Dense bf16 peak FLOP/s of ``device`` (default: the first device); None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def _attention(q_len: int, kv_len: int, width: int, kv_in: int | None = None) -> int:
  """q/k/v/out projections plus the score and value matmuls of one attention layer."""
  kv_in = width if kv_in is None else kv_in
  proj = 2 * q_len * width * width * 2 + 2 * kv_len * kv_in * width * 2  # q, out; k, v
  return proj + 2 * 2 * q_len * kv_len * width


def _mlp(length: int, width: int, hidden: int) -> int:
  return 2 * 2 * length * width * hidden


def mmsr_forward_flops(config) -> dict[str, int]:
  """Forward FLOPs of the trainable MMSR for **one example**, by part (``dit``, ``context``)."""
  mc = config.model
  factor = config.autoencoder.factor
  latent = config.data.hr_size // factor
  channels = build.autoencoder(config.autoencoder).latent_channels
  p, d = mc.patch_size, mc.width
  hidden = int(d * mc.mlp_ratio)
  tokens = (latent // p) ** 2
  s = mc.context_latents

  dit = 2 * tokens * (p * p * 2 * channels) * d  # patch embedding of [z_t ++ LR latent]
  dit += 2 * (256 * d + d * d) + 2 * d * 6 * d  # timestep MLP and adaLN-single
  block = (_attention(tokens, tokens, d) + _attention(tokens, s, d) + _mlp(tokens, d, hidden))
  dit += mc.depth * block
  dit += 2 * tokens * d * (p * p * channels)  # final projection

  vq_down = 2 ** (len(config.vq.arch.block_out_channels) - 1)
  grid = (config.data.map_size // vq_down) ** 2
  text_len, text_dim = config.text.max_length, config.text.encoder.d_model
  ctx_len = text_len + 3 * grid
  context = 2 * text_len * text_dim * d + 2 * text_len * d * d  # caption projection
  conn = (_attention(s, ctx_len, d) + _attention(s, s, d) + _mlp(s, d, hidden))
  context += mc.context_depth * conn
  return {"dit": int(dit), "context": int(context)}


def mmsr_train_flops_per_step(config) -> float:
  """Model FLOPs of one update step on ``config.batch_size`` examples (3 x forward)."""
  return 3.0 * sum(mmsr_forward_flops(config).values()) * config.batch_size
