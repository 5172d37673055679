"""``bench evaluate``: time of PSNR / SSIM / NIQE on a folder of prediction / ground-truth pairs
given by ``--evaluate_pred`` and ``--evaluate_gt`` (synthetic pairs when neither is given; the
RealSR example is in docs/evaluation.md, "Timing")."""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from mmsr_jax.benches import common


def define_flags() -> None:
  flags.DEFINE_string("evaluate_pred", None, "folder of predictions, paired by file name with "
                      "--evaluate_gt (neither given: synthetic pairs)")
  flags.DEFINE_string("evaluate_gt", None, "folder of ground truth for --evaluate_pred")
  flags.DEFINE_integer("evaluate_images", 100, "synthetic pairs when no folders are given")
  flags.DEFINE_integer("evaluate_batch", 8, "pairs per jitted call")


def check_folders(pred_dir: str | None, gt_dir: str | None) -> None:
  """Both folders or neither, each an existing directory (named by its flag)."""
  if bool(pred_dir) != bool(gt_dir):
    given, missing = (("--evaluate_pred", "--evaluate_gt") if pred_dir
                      else ("--evaluate_gt", "--evaluate_pred"))
    raise ValueError(f"{missing}: required with {given} (the bench scores pairs of the two "
                     "folders)")
  for flag, folder in (("--evaluate_pred", pred_dir), ("--evaluate_gt", gt_dir)):
    if folder and not os.path.isdir(folder):
      raise ValueError(f"{flag}={folder}: not a directory")


def run() -> dict:
  from mmsr_jax.inference import quality
  from mmsr_jax.evaluation import metrics, niqe
  f = flags.FLAGS
  pred_dir, gt_dir = f.evaluate_pred, f.evaluate_gt
  check_folders(pred_dir, gt_dir)
  out: dict = {}
  if pred_dir:
    pairs = quality.match_pairs(pred_dir, gt_dir)
    pred = np.stack([quality.read_rgb(p["pred"]) for p in pairs])
    gt = np.stack([quality.read_rgb(p["gt"]) for p in pairs])
    out["source"] = pred_dir
  else:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (f.evaluate_images, 512, 512, 3), dtype=np.uint8)
    pred = np.clip(gt + rng.normal(0, 10, gt.shape), 0, 255).astype(np.uint8)
    out["source"] = "synthetic"
  b = f.evaluate_batch

  def score():
    for i in range(0, len(pred), b):
      metrics.psnr_ssim_batch(pred[i:i + b], gt[i:i + b])
      niqe.niqe(pred[i:i + b])

  out.update(images=len(pred), height=int(pred.shape[1]), width=int(pred.shape[2]),
             batch=b, metrics_s=common.time_call(score, repeats=min(common.REPEATS.value, 3)))
  out["metrics_ms_per_image"] = 1000 * out["metrics_s"] / len(pred)
  if pred_dir:
    import time
    t0 = time.perf_counter()
    res = quality.evaluate(pred_dir, gt_dir, batch_size=b, learned_metrics=(),
                           log=lambda s: None)
    out["end_to_end_s"] = time.perf_counter() - t0
    out.update({f"mean_{k}": v for k, v in res["mean"].items()})
  out["host_peak_rss_mb"] = common.host_peak_rss() / 2**20
  return out
