"""The SR run's report: ``report.json`` (train losses, held-out ``val_loss`` per condition
setting on identical noise, PSNR / SSIM of SR and bicubic), the loss curve and one
``LR | bicubic | SR | HR`` grid per held-out crop."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.data import sr_eval_examples
from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.evaluation import metrics
from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.training import loop

# Held-out condition settings: everything, each group nulled on its own, every modality null
# (``none``), and nothing at all (``no_context``: empty caption and every modality null).
VAL_SETTINGS = ("all", "no_text", "no_depth", "no_seg", "no_edge", "none", "no_context")


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def setting_switches(name: str) -> dict[str, bool]:
  """The group switches (``sampler.make_inputs``'s ``enabled``) of a held-out setting."""
  if name == "all":
    return {}
  if name == "none":
    return {m: False for m in MODALITIES}
  if name == "no_context":
    return {g: False for g in CONTEXT_GROUPS}
  group = name[len("no_"):]
  if not name.startswith("no_") or group not in CONTEXT_GROUPS:
    raise ValueError(f"held-out setting {name!r}: expected one of {VAL_SETTINGS}")
  return {group: False}


def val_losses(config, trainer, params, examples, *, settings=VAL_SETTINGS, t: int | None = None,
               x0_error: bool = False) -> dict[str, float]:
  """Held-out diffusion loss per condition setting (same noise and timesteps for every setting).

  ``t``: one timestep for every example (None: uniform draws, as in training). ``x0_error``:
  the mean squared error of the ``x0`` the prediction implies instead of the loss; at a high-noise
  ``t`` it measures what the conditions alone say about the target.
  """
  inputs = {name: sampler.make_inputs(examples, trainer.system.tokenizer, config,
                                      enabled=setting_switches(name)) for name in settings}
  hr = jnp.asarray(np.stack([e["hr"] for e in examples]))
  model, cond, schedule = trainer.system.model, trainer.system.conditioner, trainer.system.schedule
  first = next(iter(inputs.values()))
  maps = {m: first["maps"][:, i] for i, m in enumerate(MODALITIES)}
  t_fixed = None if t is None else jnp.full((hr.shape[0],), int(t), jnp.int32)

  @jax.jit
  def loss_at(params, frozen, present, text_ids, text_mask, rng):
    batch = {"lr": first["lr"], "text_ids": text_ids, "text_mask": text_mask, **maps}
    c = cond(frozen, batch)
    ctx = model.apply({"params": params}, c["text_states"], c["text_mask"], c["ids"], present,
                      method=MMSR.encode_context)
    out = {}

    def apply(z, tt):
      pred = model.apply({"params": params}, z, tt, c["lr_latent"], ctx, method=MMSR.denoise)
      out["x0"] = schedule.to_x0_eps(pred, z, tt)[0]
      return pred
    x0 = cond.diffusion_target(frozen, hr, c["lr_latent"])
    loss = diffusion.diffusion_loss(schedule, apply, x0, rng, t=t_fixed)[0]
    return jnp.mean(jnp.square(out["x0"] - x0)) if x0_error else loss

  out = {}
  for name, inp in inputs.items():
    draws = [loss_at(params, trainer.eval_frozen(), inp["present"], inp["text_ids"], inp["text_mask"],
                     jax.random.key(10_000 + k)) for k in range(config.eval.val_batches)]
    out[name] = float(np.mean(jax.device_get(draws)))
  return out


def super_resolve(config, trainer, params, examples, *, steps: int, scale: float,
                  guidance: str, strength: float = 1.0, seed: int = 0,
                  settings: tuple[str, ...] = ("all",)) -> dict[str, np.ndarray]:
  """SR of a list of same-size examples, each one tile of its own size, under each held-out
  condition setting (one compiled sampler for all) -> ``{setting: uint8 [B, H, W, 3]}``."""
  lr_hw = np.asarray(examples[0]["lr"]).shape[:2]
  p = config.model.patch_size
  latent = max(lr_hw) * config.data.scale // config.autoencoder.factor
  grid = sampler.make_grid(config, lr_hw, tile=-(-latent // p) * p, overlap=0)
  s = trainer.system
  sample = sampler.make_sample_fn(s.model, s.conditioner, s.schedule, grid,
                                  steps=steps, guidance=guidance if scale else "none",
                                  spacing=config.sampling.spacing, clip_x0=config.sampling.clip_x0,
                                  strength=strength)
  out = {}
  for name in settings:
    inputs = sampler.make_inputs(examples, trainer.system.tokenizer, config,
                                 enabled=setting_switches(name))
    out[name] = to_uint8(sample(params, trainer.eval_frozen(), inputs, jax.random.key(seed), scale,
                                config.sampling.eta))
  return out


def example_grid(example: dict, sr_u8: np.ndarray) -> np.ndarray:
  """The grid of one held-out example and its super-resolution."""
  hr_u8, lr_u8 = to_uint8(example["hr"]), to_uint8(example["lr"])
  return grid_image(lr_u8, bicubic_upsample(lr_u8, hr_u8.shape[:2]), sr_u8, hr_u8)


def grid_image(lr_u8: np.ndarray, bicubic_u8: np.ndarray, sr_u8: np.ndarray,
               hr_u8: np.ndarray) -> np.ndarray:
  """``LR (nearest, upscaled) | bicubic | SR | HR`` side by side."""
  s = hr_u8.shape[0] // lr_u8.shape[0]
  lr_big = np.repeat(np.repeat(lr_u8, s, axis=0), s, axis=1)
  gap = np.full((hr_u8.shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([lr_big, gap, bicubic_u8, gap, sr_u8, gap, hr_u8], axis=1)


def plot_losses(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (window mean)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(config, workdir: str, trainer, state) -> dict:
  from PIL import Image
  records = loop.read_metrics(workdir)
  examples = sr_eval_examples.make_eval_examples(config, trainer.system.tokenizer, "val")
  ema = state.ema_params
  t_max = trainer.system.schedule.num_timesteps - 1
  report = {
      "step": int(jax.device_get(state.step)),
      "first_train_loss": records[0]["loss"] if records else None,
      "final_train_loss": records[-1]["loss"] if records else None,
      "val_loss": val_losses(config, trainer, ema, examples),
      # What the conditions alone say about the target: x0 error at the noisiest timestep.
      "val_x0_mse_tmax": val_losses(config, trainer, ema, examples, t=t_max, x0_error=True),
  }
  ablate = bool(config.eval.get("sample_ablation", False))
  settings = dict(steps=config.eval.steps, scale=config.eval.scale,
                  guidance=config.sampling.guidance, seed=config.sampling.seed)
  srs = super_resolve(config, trainer, ema, examples, strength=config.sampling.strength,
                      settings=VAL_SETTINGS if ablate else ("all",), **settings)
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  per_image = []
  for i, ex in enumerate(examples):
    sr_u8 = srs["all"][i]
    hr_u8, lr_u8 = to_uint8(ex["hr"]), to_uint8(ex["lr"])
    bic_u8 = bicubic_upsample(lr_u8, hr_u8.shape[:2])
    per_image.append({
        "name": ex["name"],
        "psnr_sr": metrics.psnr_y(sr_u8, hr_u8), "ssim_sr": metrics.ssim_y(sr_u8, hr_u8),
        "psnr_bicubic": metrics.psnr_y(bic_u8, hr_u8),
        "ssim_bicubic": metrics.ssim_y(bic_u8, hr_u8)})
    Image.fromarray(example_grid(ex, sr_u8)).save(
        os.path.join(workdir, "samples", f"{ex['name']}.png"))
  if config.sampling.strength < 1.0:  # also score sampling from pure noise, for comparison
    pure = super_resolve(config, trainer, ema, examples, strength=1.0, **settings)["all"]
    for p, ex, out in zip(per_image, examples, pure):
      hr_u8 = to_uint8(ex["hr"])
      p["psnr_sr_from_noise"] = metrics.psnr_y(out, hr_u8)
      p["ssim_sr_from_noise"] = metrics.ssim_y(out, hr_u8)
  for key in per_image[0]:
    if key != "name":
      report[key] = float(np.mean([p[key] for p in per_image]))
  if ablate:  # the same samples (seed, steps) with each held-out setting's conditions
    hrs = [to_uint8(ex["hr"]) for ex in examples]
    report["sample_ablation"] = {
        metric: {name: float(np.mean([fn(out, hr) for out, hr in zip(srs[name], hrs)]))
                 for name in VAL_SETTINGS}
        for metric, fn in (("psnr_sr", metrics.psnr_y), ("ssim_sr", metrics.ssim_y))}
  report["per_image"] = per_image
  guided = config.eval.scale > 0
  report["eval"] = {
      "steps": config.eval.steps, "guidance_scale": config.eval.scale,
      "guidance": config.sampling.guidance if guided else "none",
      "negative_branch": guidance_lib.describe_negative(
          config.sampling.guidance if guided else "none", config.sampling.negative_prompt),
      "strength": config.sampling.strength, "eta": config.sampling.eta,
      "size": int(examples[0]["hr"].shape[0]), "images": len(examples),
      "maps_from": config.data.get("maps_from", "record"),
      "present": {m: int(sum(bool(ex["present"][i]) for ex in examples))
                  for i, m in enumerate(MODALITIES)},
      "x0_mse_t": t_max}
  # Which negative each guidance mode uses with this config (sample / controls commands).
  report["guidance_negatives"] = {
      mode: guidance_lib.describe_negative(mode, config.sampling.negative_prompt)
      for mode in guidance_lib.GUIDANCE_MODES}
  if records:
    plot_losses(records, os.path.join(workdir, "loss_curve.png"))
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
