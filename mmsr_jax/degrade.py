r"""Writes contact sheets of the training degradations of an image, to look at what the model sees:
``python -m mmsr_jax.degrade --input=photo.png --output=DIR [--preset=realesrgan] [--num=8]``.
"""

from __future__ import annotations

import os

from absl import flags

from mmsr_jax import cli
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


def main(argv) -> None:
  del argv
  from mmsr_jax.data import degradation_samples as lib  # jax: not needed for --help
  f = flags.FLAGS
  if not f.input or not f.output:
    raise ValueError("--input and --output are required")
  if f.num < 1 or f.scale < 1:
    raise ValueError("--num and --scale must be >= 1")
  lib.check_preset(f.preset)
  if not os.path.isfile(f.input):
    raise FileNotFoundError(f"--input={f.input!r}: no such file")
  limit = images.check_limit(f.max_pixels, "--max_pixels")
  try:
    hr = images.read_image(f.input, limit, "--max_pixels")
  except images.BadImage as e:
    raise ValueError(f"--input={f.input!r}: {e}") from e
  hr = lib.fit_image(hr, f.scale, f.max_side, f"--input={f.input!r}")
  cli.refuse_existing([os.path.join(f.output, n) for n in lib.output_names(f.num)], f.overwrite)
  lrs, params = lib.degrade_samples(hr, f.preset, f.scale, f.num, f.seed)
  lib.write_samples(f.output, hr, lrs, params, f.seed)
  h, w = hr.shape[:2]
  print(f"wrote {f.num} samples ({h // f.scale}x{w // f.scale} from {h}x{w}) and "
        f"{lib.SHEET_FILE} to {f.output}")


if __name__ == "__main__":
  cli.run(main, define_flags)
