r"""Writes contact sheets of the training degradations of an image, to look at what the model sees:
``python -m mmsr_jax.degrade --input=photo.png --output=DIR [--preset=realesrgan] [--num=8]``.
"""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np
from absl import flags

from mmsr_jax.data import images


def define_flags() -> None:
  flags.DEFINE_string("input", None, "The HR image file.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_integer("num", 16, "How many degraded samples.")
  flags.DEFINE_integer("seed", 0, "Seed; sample i uses (seed, i).")
  flags.DEFINE_string("preset", "realesrgan", "realesrgan, seesr or simple.")
  flags.DEFINE_integer("scale", 4, "Downscaling factor.")
  flags.DEFINE_integer("max_side", 1024, "Center-crop larger images to this side first (0: no).")
  flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
  flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS, "Largest input read (pixels, "
                       "checked from the header before decoding).")


def contact_sheet(hr: np.ndarray, samples: list[np.ndarray], cols: int = 0) -> np.ndarray:
  """The HR image followed by the samples (nearest-upscaled to the HR size) on a grid."""
  h, w = hr.shape[:2]
  tiles = [hr] + [cv2.resize(s, (w, h), interpolation=cv2.INTER_NEAREST) for s in samples]
  cols = cols or int(math.ceil(math.sqrt(len(tiles))))
  rows = int(math.ceil(len(tiles) / cols))
  sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
  for k, t in enumerate(tiles):
    r, c = divmod(k, cols)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
  return sheet


def _jsonable(p: dict) -> dict:
  out = {}
  for k, v in p.items():
    v = np.asarray(v)
    if k in ("k1", "k2", "sinc"):
      nz = np.argwhere(np.abs(v) > 0)
      out[k + "_support"] = int(nz[:, 0].max() - nz[:, 0].min() + 1) if len(nz) else 0
    else:
      out[k] = v.tolist()
  return out


def main(argv) -> None:
  del argv
  from mmsr_jax.data import realesrgan  # pylint: disable=g-import-not-at-top
  from mmsr_jax.data.simple_degradation import simple_degrade  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f.input or not f.output:
    raise ValueError("--input and --output are required")
  if f.num < 1 or f.scale < 1:
    raise ValueError("--num and --scale must be >= 1")
  if f.preset != "simple":
    realesrgan.get_preset(f.preset)
  if not os.path.isfile(f.input):
    raise FileNotFoundError(f"--input={f.input!r}: no such file")
  limit = images.check_limit(f.max_pixels, "--max_pixels")
  try:
    hr = images.read_image(f.input, limit, "--max_pixels")
  except images.BadImage as e:
    raise ValueError(f"--input={f.input!r}: {e}") from e
  h, w = hr.shape[:2]
  if f.max_side and max(h, w) > f.max_side:
    nh, nw = min(h, f.max_side), min(w, f.max_side)
    hr = hr[(h - nh) // 2:(h - nh) // 2 + nh, (w - nw) // 2:(w - nw) // 2 + nw]
    h, w = nh, nw
  h, w = h - h % f.scale, w - w % f.scale
  if min(h, w) < 4 * f.scale:
    raise ValueError(f"--input={f.input!r}: {hr.shape[0]}x{hr.shape[1]} is too small for "
                     f"scale {f.scale}")
  hr = np.ascontiguousarray(hr[:h, :w])
  names = [f"lr_{i:02d}.png" for i in range(f.num)] + [
      f"params_{i:02d}.json" for i in range(f.num)] + ["contact_sheet.png"]
  existing = [n for n in names if os.path.exists(os.path.join(f.output, n))]
  if existing and not f.overwrite:
    raise FileExistsError(f"{os.path.join(f.output, existing[0])} exists (and "
                          f"{len(existing) - 1} more); pass --overwrite to replace")
  os.makedirs(f.output, exist_ok=True)
  hr01 = hr.astype(np.float32) / np.float32(255.0)
  samples, params = [], []
  if f.preset == "simple":
    for i in range(f.num):
      samples.append(simple_degrade(hr01, np.random.default_rng([f.seed, i]), scale=f.scale))
      params.append({"preset": "simple"})
  else:
    deg = realesrgan.RealESRGANDegrader(f.preset, f.scale)
    ps = [deg.sample(np.random.default_rng([f.seed, i]), (h, w)) for i in range(f.num)]
    for b in range(0, f.num, 8):  # batches of 8: one compilation, bounded memory
      chunk = ps[b:b + 8]
      samples += list(deg(np.repeat(hr01[None], len(chunk), 0), realesrgan.stack_params(chunk)))
    params = [dict(_jsonable(p), preset=f.preset) for p in ps]
  lrs = [np.round(s * 255.0).astype(np.uint8) for s in samples]
  for i, (lr, p) in enumerate(zip(lrs, params)):
    cv2.imwrite(os.path.join(f.output, f"lr_{i:02d}.png"), lr[..., ::-1])
    with open(os.path.join(f.output, f"params_{i:02d}.json"), "w") as fh:
      json.dump(dict(p, seed=[f.seed, i], lr_size=list(lr.shape[:2])), fh, indent=1)
  cv2.imwrite(os.path.join(f.output, "contact_sheet.png"), contact_sheet(hr, lrs)[..., ::-1])
  print(f"wrote {f.num} samples ({h // f.scale}x{w // f.scale} from {h}x{w}) and "
        f"contact_sheet.png to {f.output}")


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
