"""The option lists and limits a config is checked against. Each is defined here, on the floor of
the schema, and the module that implements the option imports it from here, so that reading and
validating a config imports no model, diffusion or data code (no JAX, Flax or OpenCV)."""

from __future__ import annotations

# model.attention and model.remat (mmsr_jax/models/layers.py)
ATTENTION = ("auto", "xla", "cudnn", "flash")
REMAT = ("none", "full", "dots")

# diffusion.schedule, diffusion.prediction, sampling.spacing (mmsr_jax/diffusion/schedule.py)
SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTIONS = ("epsilon", "v")
SPACINGS = ("leading", "trailing")

# sampling.guidance (mmsr_jax/diffusion/guidance.py)
GUIDANCE_MODES = ("cfg", "m0cfg", "mcfg")

# The second-order degradation presets of data.degradation (the keys of
# mmsr_jax/data/realesrgan_params.py:PRESETS).
DEGRADATION_PRESETS = ("realesrgan", "seesr")

# Largest image any reader decodes by default (8192 x 8192, 201 MB as uint8 RGB; below Pillow's
# own decompression-bomb warning at 89.5 MP). Every reader checks the header against a limit
# before decoding, so a small file claiming a huge size is refused without allocating it.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Largest input of the super-resolver by default (2048 x 2048): its x4 output is 16 times larger,
# i.e. DEFAULT_MAX_PIXELS, and its tiles times the sampling steps set the run time.
DEFAULT_MAX_INPUT_PIXELS = 2048 * 2048


def pillow_limit() -> int:
  """Pixels above which Pillow refuses to open a file at all (twice ``Image.MAX_IMAGE_PIXELS``)."""
  from PIL import Image  # read when a limit is checked, not when a config is
  return 2 * int(Image.MAX_IMAGE_PIXELS or 0) or 2 ** 62
