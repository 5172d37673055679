"""Quality evaluation (``python -m mmsr_jax.evaluate``): scores super-resolved images the way the
diffusion-SR papers do: pairs matched by file name, PSNR / SSIM on MATLAB's Y channel, NIQE (pyiqa
conventions), and LPIPS / DISTS / FID where their weights exist; a papers-style Markdown table,
JSON and per-image CSV. :func:`run_and_score` first runs a trained model on a test set's
``test_LR`` folder. It stands beside the super-resolver it drives; the metrics themselves are in
``mmsr_jax/evaluation/``."""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import json
import math
import os
import time
from typing import Callable

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.data import images as image_io
from mmsr_jax.evaluation import dists, inception, lpips, metrics, niqe
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.weights import params_io
from mmsr_jax.weights.metric_nets import DEFAULT_DIR, FILES, how_to_get

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# Column order of the tables; (key, header, higher is better).
COLUMNS = (("psnr", "PSNR", True), ("ssim", "SSIM", True), ("lpips", "LPIPS", False),
           ("lpips_vgg", "LPIPS-VGG", False), ("dists", "DISTS", False),
           ("niqe", "NIQE", False), ("fid", "FID", False))


LEARNED = {"lpips": "lpips_alex", "lpips_vgg": "lpips_vgg", "dists": "dists", "fid": "fid"}


def list_images(folder: str, field: str) -> dict[str, str]:
  """``{name without extension: path}`` of the images directly in ``folder``."""
  if not os.path.isdir(folder):
    raise NotADirectoryError(f"--{field}={folder}: not a directory")
  out: dict[str, str] = {}
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    path = os.path.join(folder, entry)
    if ext.lower() not in IMAGE_SUFFIXES or not os.path.isfile(path):
      continue
    if stem in out:
      raise ValueError(f"--{field}={folder}: two images named {stem!r} "
                       f"({os.path.basename(out[stem])}, {entry})")
    out[stem] = path
  if not out:
    raise FileNotFoundError(f"--{field}={folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
  return out


def image_size(path: str, max_pixels: int = image_io.DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """(height, width) from the file header; an unreadable file, or one over ``max_pixels``
  (``--max_pixels``), is an error naming it."""
  return image_io.header_size(path, max_pixels, "--max_pixels")


def read_picture(path: str, max_pixels: int = image_io.DEFAULT_MAX_PIXELS) -> image_io.Picture:
  """The file as stored (no EXIF rotation, as the papers' pyiqa scripts read it), through the
  project's one image reader: bit depth and grey / colour come from the file's mode."""
  return image_io.read(path, max_pixels, "--max_pixels", oriented=False)


def to_uint8(pic: image_io.Picture) -> np.ndarray:
  """HxWx3 uint8 RGB of a picture (grey repeated, alpha dropped, 16-bit scaled by 255/65535)."""
  return np.round(np.clip(pic.rgb, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def read_rgb(path: str, max_pixels: int = image_io.DEFAULT_MAX_PIXELS) -> np.ndarray:
  """HxWx3 uint8 RGB of an image file (see :func:`read_picture` and :func:`to_uint8`)."""
  return to_uint8(read_picture(path, max_pixels))


def _kind(pic: image_io.Picture) -> str:
  return "grey" if pic.grey else "colour"


def match_pairs(pred_dir: str, gt_dir: str, lr_dir: str | None = None,
                max_pixels: int = image_io.DEFAULT_MAX_PIXELS) -> list[dict]:
  """The checked list of ``{name, pred, gt, lr, size, scale}`` (sizes read from headers only;
  a file over ``max_pixels`` is an error before anything is decoded)."""
  preds = list_images(pred_dir, "pred")
  gts = list_images(gt_dir, "gt")
  lrs = list_images(lr_dir, "lr") if lr_dir else {}
  for name in preds:
    if name not in gts:
      raise FileNotFoundError(f"{preds[name]}: no ground truth named {name}.* in {gt_dir}")
  for name in gts:
    if name not in preds:
      raise FileNotFoundError(f"{gts[name]}: no prediction named {name}.* in {pred_dir}")
  pairs = []
  for name in sorted(gts):
    hw = image_size(gts[name], max_pixels)
    phw = image_size(preds[name], max_pixels)
    if phw != hw:
      raise ValueError(f"{preds[name]}: size {phw[0]}x{phw[1]} but its ground truth "
                       f"{gts[name]} is {hw[0]}x{hw[1]}")
    pair = {"name": name, "pred": preds[name], "gt": gts[name], "lr": None, "size": hw}
    if lr_dir:
      if name not in lrs:
        raise FileNotFoundError(f"{gts[name]}: no LR image named {name}.* in {lr_dir}")
      lhw = image_size(lrs[name], max_pixels)
      if hw[0] % lhw[0] or hw[1] % lhw[1] or hw[0] // lhw[0] != hw[1] // lhw[1]:
        raise ValueError(f"{lrs[name]}: size {lhw[0]}x{lhw[1]} is not an integer fraction of "
                         f"its ground truth's {hw[0]}x{hw[1]}")
      pair["lr"] = lrs[name]
    pairs.append(pair)
  return pairs


def bicubic(lr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """OpenCV bicubic upsampling of uint8 RGB to (height, width), the tables' baseline."""
  return cv2.resize(lr, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)


@functools.lru_cache(maxsize=None)
def _jitted(metric: str) -> Callable:
  """One jitted function per learned metric (compiled once per image size per process)."""
  if metric == "dists":
    return jax.jit(dists.dists_from_uint8)
  if metric == "fid":
    return jax.jit(inception.features_from_uint8)
  return jax.jit(functools.partial(lpips.lpips_from_uint8, net=metric.split("_")[1]))


def load_learned(weights_dir: str, wanted=tuple(LEARNED),
                 log: Callable[[str], None] = print) -> dict[str, Callable]:
  """Jitted ``fn(pred_u8, gt_u8) -> (B,)`` for each learned metric whose weights are present
  (for ``fid``: ``fn(images_u8) -> (B, 2048)`` Inception features).

  A missing file is reported with one ``log`` line (which file, how to make it) and skipped.
  """
  fns = {}
  for key in wanted:
    metric = LEARNED[key]
    path = os.path.join(os.path.expanduser(weights_dir), FILES[metric])
    if not os.path.isfile(path):
      log(how_to_get(metric, weights_dir))
      continue
    if metric == "dists":
      params = params_io.load_params(path, dists.abstract_params(), field=metric)
    elif metric == "fid":
      params = params_io.load_params(path, inception.abstract_params(), field=metric)
    else:
      params = params_io.load_params(path, lpips.abstract_params(metric.split("_")[1]),
                                     field=metric)
    fns[key] = functools.partial(_jitted(metric), jax.device_put(params))
  return fns


def _score_batch(pred: np.ndarray, gt: np.ndarray, learned: dict[str, Callable], *,
                 crop_border: int, niqe_color: str) -> dict[str, np.ndarray]:
  """All metrics of one batch of equally sized uint8 pairs -> {metric: (B,) float64}."""
  out = {}
  out["psnr"], out["ssim"] = metrics.psnr_ssim_batch(pred, gt, crop_border=crop_border)
  for key, fn in learned.items():
    if key != "fid":
      out[key] = np.asarray(fn(jnp.asarray(pred), jnp.asarray(gt)), np.float64)
  try:
    niqe.crop_to_blocks(pred.shape[1:3])
    out["niqe"] = niqe.niqe(pred, color=niqe_color)
  except ValueError:  # too small for NIQE's two 96x96 blocks
    out["niqe"] = np.full(len(pred), np.nan)
  return out


def _mean(values: list[float]) -> float | None:
  """Mean of the values that exist (None = metric not defined for that image)."""
  ok = [v for v in values if v is not None]
  return float(np.mean(ok)) if ok else None


def _json_safe(x):
  """+inf (PSNR of identical images) as the string "inf"; JSON has no infinity."""
  if isinstance(x, float) and math.isinf(x):
    return "inf" if x > 0 else "-inf"
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_json_safe(v) for v in x]
  return x


def evaluate(pred_dir: str, gt_dir: str, lr_dir: str | None = None, *, crop_border: int = 0,
             weights_dir: str = DEFAULT_DIR, batch_size: int = 8, niqe_color: str = "yiq",
             learned_metrics=tuple(LEARNED), max_pixels: int = image_io.DEFAULT_MAX_PIXELS,
             log: Callable[[str], None] = print) -> dict:
  """Scores ``pred_dir`` (and the bicubic baseline of ``lr_dir``) against ``gt_dir``.

  Returns the JSON-ready result: ``mean``, ``per_image``, ``metrics`` (those that ran),
  ``skipped``, ``warnings`` (e.g. a grey prediction scored against colour ground truth; also in
  that image's row) and ``baselines`` (``{"bicubic": {"mean", "per_image"}}`` with ``lr_dir``).
  Images larger than ``max_pixels`` are refused by their headers, before any decoding.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  if crop_border < 0:
    raise ValueError(f"crop_border={crop_border}: expected >= 0")
  if niqe_color not in ("yiq", "ycbcr"):
    raise ValueError(f"niqe_color={niqe_color!r}: expected 'yiq' or 'ycbcr'")
  max_pixels = image_io.check_limit(max_pixels, "--max_pixels")
  pairs = match_pairs(pred_dir, gt_dir, lr_dir, max_pixels)
  for p in pairs:
    if min(p["size"]) - 2 * crop_border < metrics.SSIM_WINDOW:
      raise ValueError(f"{p['gt']}: {p['size'][0]}x{p['size'][1]} with crop_border="
                       f"{crop_border} is smaller than the 11x11 SSIM window")
  learned = load_learned(weights_dir, learned_metrics, log)
  methods = ["ours"] + (["bicubic"] if lr_dir else [])
  rows = {m: {p["name"]: {"name": p["name"]} for p in pairs} for m in methods}
  groups: dict[tuple[int, int], list[dict]] = {}
  for p in pairs:
    groups.setdefault(p["size"], []).append(p)
  fid_feats: dict[str, list[np.ndarray]] = {m: [] for m in methods + ["gt"]}
  mixed: dict[str, str] = {}  # name -> why the pair mixes grey and colour
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    def load(chunk):
      def one(p):
        gt = read_picture(p["gt"], max_pixels)
        pred = read_picture(p["pred"], max_pixels)
        if pred.grey != gt.grey:
          mixed[p["name"]] = (f"{_kind(pred)} prediction {p['pred']} scored against "
                              f"{_kind(gt)} ground truth {p['gt']} (grey taken as R=G=B)")
        images = {"ours": to_uint8(pred)}
        if p["lr"]:
          images["bicubic"] = bicubic(read_rgb(p["lr"], max_pixels), p["size"])
        return to_uint8(gt), images
      return list(pool.map(one, chunk))

    chunks = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    pending = pool.submit(load, chunks[0]) if chunks else None
    for i, chunk in enumerate(chunks):
      loaded = pending.result()
      pending = pool.submit(load, chunks[i + 1]) if i + 1 < len(chunks) else None
      gt = np.stack([g for g, _ in loaded])
      if "fid" in learned:
        fid_feats["gt"].append(np.asarray(learned["fid"](jnp.asarray(gt)), np.float64))
      for m in methods:
        pred = np.stack([imgs[m] for _, imgs in loaded])
        if "fid" in learned:
          fid_feats[m].append(np.asarray(learned["fid"](jnp.asarray(pred)), np.float64))
        scores = _score_batch(pred, gt, learned, crop_border=crop_border, niqe_color=niqe_color)
        for j, p in enumerate(chunk):
          for key, values in scores.items():
            v = float(values[j])
            rows[m][p["name"]][key] = v if math.isfinite(v) or key == "psnr" else None
  seconds = time.time() - t0
  ran = [k for k, _, _ in COLUMNS if k in ("psnr", "ssim", "niqe") or k in learned]
  skipped = {k: how_to_get(LEARNED[k], weights_dir) for k in learned_metrics if k not in learned}

  fid = {}
  if "fid" in learned:
    if len(pairs) < 2:
      log("fid: needs at least two images; not computed")
    else:
      gt_f = np.concatenate(fid_feats["gt"])
      fid = {m: inception.fid_from_features(np.concatenate(fid_feats[m]), gt_f) for m in methods}

  def summary(m):
    per_image = [rows[m][p["name"]] for p in pairs]
    mean = {k: _mean([r.get(k) for r in per_image]) for k in ran if k != "fid"}
    if "fid" in ran:  # a property of the whole set (against the ground-truth set), not per image
      mean["fid"] = fid.get(m)
    return {"mean": mean, "per_image": per_image}

  result = {"pred": pred_dir, "gt": gt_dir, "lr": lr_dir, "num_images": len(pairs),
            "settings": {"crop_border": crop_border, "niqe_color": niqe_color,
                         "y_channel": "MATLAB YCbCr", "batch_size": batch_size},
            "metrics": ran, "skipped": skipped, "seconds": round(seconds, 3)}
  result.update(summary("ours"))
  result["warnings"] = [f"{n}: {mixed[n]}" for n in sorted(mixed)]
  for r in result["per_image"]:
    if r["name"] in mixed:
      r["warning"] = mixed[r["name"]]
  for w in result["warnings"]:
    log(f"warning: {w}")
  if lr_dir:
    result["baselines"] = {"bicubic": summary("bicubic")}
  if any(r.get("niqe") is None for r in result["per_image"]):
    log("niqe: images smaller than two 96x96 blocks get no NIQE (left out of the mean)")
  return result


def _fmt(v) -> str:
  return "-" if v is None else ("inf" if v == math.inf else f"{v:.4f}")


def markdown_table(result: dict, name: str = "ours") -> str:
  """The papers' table: one row per method, the metrics that ran as columns."""
  cols = [(k, h, up) for k, h, up in COLUMNS if k in result["metrics"]]
  head = "| method | " + " | ".join(h + ("↑" if up else "↓") for _, h, up in cols) + " |"
  lines = [head, "|" + "---|" * (len(cols) + 1)]
  methods = [(name, result["mean"])] + [(m, r["mean"])
                                         for m, r in result.get("baselines", {}).items()]
  for m, mean in methods:
    lines.append(f"| {m} | " + " | ".join(_fmt(mean.get(k)) for k, _, _ in cols) + " |")
  warns = result.get("warnings", [])
  if warns:
    lines += ["", f"**WARNING**: {len(warns)} of {result['num_images']} pairs mix a grey and a "
              "colour image, so their scores compare different kinds of image:"]
    lines += [f"- {w}" for w in warns]
  return "\n".join(lines)


def write_csv(path: str, result: dict, name: str = "ours") -> None:
  keys = [k for k in result["metrics"] if k != "fid"]  # FID is per set, in the JSON mean only
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "name"] + keys)
    tables = [(name, result["per_image"])] + [(m, r["per_image"])
                                              for m, r in result.get("baselines", {}).items()]
    for m, per_image in tables:
      for r in per_image:
        w.writerow([m, r["name"]] + ["" if r.get(k) is None else repr(r[k]) for k in keys])


def refuse_existing(paths: list[str | None], overwrite: bool) -> None:
  """FileExistsError for the first of ``paths`` (None: not written) that exists, unless
  ``overwrite``."""
  for p in paths:
    if p and os.path.exists(p) and not overwrite:
      raise FileExistsError(f"{p} exists; pass --overwrite to replace it")


def run_and_score(benchmark: str, workdir: str, output: str, *, overwrite: bool = False,
                  log: Callable[[str], None] = print, **eval_kwargs) -> dict:
  """Super-resolves ``benchmark/test_LR`` with the run in ``workdir`` into ``output``, then
  scores the results against ``benchmark/test_HR`` (with the bicubic baseline)."""
  lr_dir, gt_dir = os.path.join(benchmark, "test_LR"), os.path.join(benchmark, "test_HR")
  for d, field in ((lr_dir, "benchmark"), (gt_dir, "benchmark")):
    if not os.path.isdir(d):
      raise NotADirectoryError(f"--{field}={benchmark}: expected sub-folders test_LR/ and "
                               f"test_HR/; {d} is missing")
  lrs = list_images(lr_dir, "benchmark")
  outs = {n: os.path.join(output, n + ".png") for n in lrs}
  refuse_existing(list(outs.values()), overwrite)
  match_gt = list_images(gt_dir, "benchmark")
  for n, p in lrs.items():
    if n not in match_gt:
      raise FileNotFoundError(f"{p}: no ground truth named {n}.* in {gt_dir}")
  sr = SuperResolver.from_workdir(workdir)
  os.makedirs(output, exist_ok=True)
  t0 = time.time()
  for i, (n, p) in enumerate(sorted(lrs.items())):
    out, _ = sr.upscale(read_picture(p, eval_kwargs.get("max_pixels",
                                                        image_io.DEFAULT_MAX_PIXELS)))
    image_io.write_png(outs[n], out)  # the input's kind (grey stays grey, 16 bits stay 16)
    log(f"[{i + 1}/{len(lrs)}] {n}: {out.size[1]}x{out.size[0]}")
  sr_seconds = time.time() - t0
  result = evaluate(output, gt_dir, lr_dir, log=log, **eval_kwargs)
  result["benchmark"] = {"dir": benchmark, "workdir": workdir, "sr_seconds": round(sr_seconds, 3),
                         "sr_seconds_per_image": round(sr_seconds / len(lrs), 3)}
  return result


def write_results(result: dict, name: str, table: str, *, json_path: str | None,
                  csv_path: str | None, md_path: str | None) -> None:
  """Writes the result as JSON, its per-image scores as CSV and ``table`` (``markdown_table``) as
  Markdown, each where a path is given; ``name`` labels the evaluated method's rows."""
  if json_path:
    with open(json_path, "w") as fh:
      json.dump(_json_safe(result), fh, indent=1, allow_nan=False)
  if csv_path:
    write_csv(csv_path, result, name)
  if md_path:
    with open(md_path, "w") as fh:
      fh.write(table + "\n")
