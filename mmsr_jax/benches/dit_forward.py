"""``bench dit-forward``: our DiT against diffusers' ``PixArtTransformer2DModel`` with the same
converted weights and inputs: time of each and the largest output difference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mmsr_jax.benches import common

# name -> (depth, width, heads): PixArt-XL-2 and the smaller DiT sizes of configs/dit_{b,l}.py.
SIZES = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "tiny": (2, 128, 4)}


def define_flags() -> None:
  flags.DEFINE_enum("dit_size", "xl", list(SIZES), "DiT size.")
  flags.DEFINE_integer("dit_latent", 64, "Latent side (64 = 512px images with the f8 VAE).")
  flags.DEFINE_integer("dit_batch", 2, "Batch (2 = one image with classifier-free guidance).")
  flags.DEFINE_integer("dit_text_len", 120, "Caption tokens (PixArt uses 120).")
  flags.DEFINE_integer("dit_caption_channels", 4096, "Text-state width (T5-XXL: 4096).")
  flags.DEFINE_enum("dit_dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype of both models.")


def run() -> dict:
  import torch
  from diffusers import PixArtTransformer2DModel

  from mmsr_jax.models.dit import DiT
  from mmsr_jax.weights.pixart import CaptionProjection, pixart_params_from_torch_state_dict
  F = flags.FLAGS

  depth, width, heads = SIZES[F.dit_size]
  lat, b, n_txt, cap = F.dit_latent, F.dit_batch, F.dit_text_len, F.dit_caption_channels
  torch.manual_seed(0)
  ref = PixArtTransformer2DModel(
      sample_size=lat, patch_size=2, in_channels=4, out_channels=8, num_layers=depth,
      attention_head_dim=width // heads, num_attention_heads=heads, cross_attention_dim=width,
      caption_channels=cap, norm_type="ada_norm_single", use_additional_conditions=False).eval()
  with torch.no_grad():  # diffusers zero-initialises some projections: make every output count
    for p in ref.parameters():
      if not p.abs().sum():
        p.normal_(0, 0.02)
  sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
  dit_vars, cap_vars = pixart_params_from_torch_state_dict(sd, depth=depth)
  del sd

  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 4, lat, lat)).astype(np.float32)
  t = np.linspace(10, 900, b).astype(np.float32)
  text = rng.standard_normal((b, n_txt, cap)).astype(np.float32)

  # --- Reference.
  use_cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if use_cuda else "cpu")
  tdtype = torch.bfloat16 if F.dit_dtype == "bfloat16" else torch.float32
  if not use_cuda:
    torch.set_num_threads(os.cpu_count() or 1)
  ref = ref.to(dev) if tdtype == torch.float32 else ref.to(dev, tdtype)
  xt, tt, txt = (torch.from_numpy(a).to(dev) for a in (x, t, text))
  xt, txt = xt.to(tdtype), txt.to(tdtype)

  def theirs():
    with torch.no_grad():
      out = ref(xt, encoder_hidden_states=txt, timestep=tt, return_dict=False)[0]
    if use_cuda:
      torch.cuda.synchronize()
    return out

  ref_s = common.time_call(theirs)
  want = theirs().float().cpu().numpy()
  del ref

  # --- Ours (NHWC).
  dtype = jnp.dtype(F.dit_dtype)
  dit = DiT(out_channels=8, width=width, depth=depth, num_heads=heads, patch_size=2,
            pos_base_size=lat // 2, dtype=dtype)
  proj = CaptionProjection(width, dtype=dtype)

  @jax.jit
  def forward(dv, cv, x, t, text):
    return dit.apply(dv, x, t, proj.apply(cv, text))

  dv, cv = jax.device_put(dit_vars), jax.device_put(cap_vars)
  xj, tj, textj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(text)
  ours_s = common.time_call(lambda: forward(dv, cv, xj, tj, textj).block_until_ready())
  got = np.asarray(forward(dv, cv, xj, tj, textj)).transpose(0, 3, 1, 2)

  return {
      "model": f"PixArt DiT {F.dit_size}: depth {depth}, width {width}, {heads} heads",
      "tokens": (lat // 2) ** 2, "batch": b, "dtype": F.dit_dtype,
      "ours_s": ours_s, "reference_s": ref_s, "ratio": ours_s / ref_s,
      "reference_device": str(dev), "max_abs_diff": float(np.max(np.abs(got - want))),
      "output_scale": float(np.max(np.abs(want))),
  }
