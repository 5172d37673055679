"""The SR run's report: ``report.json`` (train losses, held-out ``val_loss`` per condition
setting on identical noise, PSNR / SSIM of SR and bicubic), the loss curve and one
``LR | bicubic | SR | HR`` grid per held-out crop."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.data import sr_examples
from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.evaluation import metrics
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.training import loop

VAL_SETTINGS = ("all", "none", "no_text")


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def val_losses(config, trainer, params, examples) -> dict[str, float]:
  """Held-out diffusion loss per condition setting (same noise/timesteps for every setting)."""
  inputs = sampler.make_inputs(examples, trainer.tokenizer, config)
  hr = jnp.asarray(np.stack([e["hr"] for e in examples]))
  model, cond, schedule = trainer.model, trainer.conditioner, trainer.schedule

  @jax.jit
  def loss_at(params, frozen, present, text_ids, text_mask, rng):
    batch = {"lr": inputs["lr"], "text_ids": text_ids, "text_mask": text_mask}
    batch.update({m: inputs["maps"][:, i] for i, m in enumerate(MODALITIES)})
    c = cond(frozen, batch)
    ctx = model.apply({"params": params}, c["text_states"], c["text_mask"], c["ids"], present,
                      method=MMSR.encode_context)
    apply = lambda z, t: model.apply({"params": params}, z, t, c["lr_latent"], ctx,  # noqa: E731
                                     method=MMSR.denoise)
    x0 = cond.diffusion_target(frozen, hr, c["lr_latent"])
    return diffusion.diffusion_loss(schedule, apply, x0, rng)[0]

  settings = {
      "all": (inputs["present"], inputs["text_ids"], inputs["text_mask"]),
      "none": (np.zeros_like(inputs["present"]), inputs["text_ids"], inputs["text_mask"]),
      "no_text": (inputs["present"], inputs["null_ids"], inputs["null_mask"]),
  }
  out = {}
  for name, (present, ids, mask) in settings.items():
    draws = [loss_at(params, trainer.frozen, present, ids, mask, jax.random.key(10_000 + k))
             for k in range(config.eval.val_batches)]
    out[name] = float(np.mean(jax.device_get(draws)))
  return out


def super_resolve(config, trainer, params, examples, *, steps: int, scale: float,
                  guidance: str, strength: float = 1.0, seed: int = 0) -> np.ndarray:
  """SR of a list of same-size examples, each one tile of its own size -> uint8 ``[B, H, W, 3]``."""
  inputs = sampler.make_inputs(examples, trainer.tokenizer, config)
  lr_hw = inputs["lr"].shape[1:3]
  p = config.model.patch_size
  latent = max(lr_hw) * config.data.scale // config.autoencoder.factor
  grid = sampler.make_grid(config, lr_hw, tile=-(-latent // p) * p, overlap=0)
  sample = sampler.make_sample_fn(trainer.model, trainer.conditioner, trainer.schedule, grid,
                                  steps=steps, guidance=guidance if scale else "none",
                                  spacing=config.sampling.spacing, clip_x0=config.sampling.clip_x0,
                                  strength=strength)
  out = sample(params, trainer.frozen, inputs, jax.random.key(seed), scale, config.sampling.eta)
  return to_uint8(out)


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
  examples = sr_examples.make_eval_examples(config, trainer.tokenizer, "val")
  ema = state.ema_params
  report = {
      "step": int(jax.device_get(state.step)),
      "first_train_loss": records[0]["loss"] if records else None,
      "final_train_loss": records[-1]["loss"] if records else None,
      "val_loss": val_losses(config, trainer, ema, examples),
  }
  settings = dict(steps=config.eval.steps, scale=config.eval.scale,
                  guidance=config.sampling.guidance, seed=config.sampling.seed)
  sr = super_resolve(config, trainer, ema, examples, strength=config.sampling.strength,
                     **settings)
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  per_image = []
  for ex, sr_u8 in zip(examples, sr):
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
    pure = super_resolve(config, trainer, ema, examples, strength=1.0, **settings)
    for p, ex, out in zip(per_image, examples, pure):
      hr_u8 = to_uint8(ex["hr"])
      p["psnr_sr_from_noise"] = metrics.psnr_y(out, hr_u8)
      p["ssim_sr_from_noise"] = metrics.ssim_y(out, hr_u8)
  for key in per_image[0]:
    if key != "name":
      report[key] = float(np.mean([p[key] for p in per_image]))
  report["per_image"] = per_image
  report["eval"] = {"steps": config.eval.steps, "guidance_scale": config.eval.scale,
                    "strength": config.sampling.strength, "eta": config.sampling.eta,
                    "size": int(examples[0]["hr"].shape[0]), "images": len(examples)}
  if records:
    plot_losses(records, os.path.join(workdir, "loss_curve.png"))
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
