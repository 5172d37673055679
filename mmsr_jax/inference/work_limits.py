"""What one input may cost before the model loads: its pixels, its aspect ratio and the number of
sampler tiles it needs, from the run's config alone.
"""

from __future__ import annotations

import math

from mmsr_jax.data import images as image_io
from mmsr_jax.diffusion import sampler

DEFAULT_MAX_ASPECT_RATIO = 16.0  # runs saved before config.sampling.max_aspect_ratio existed


def lr_multiple(config) -> int:
  """LR sides are padded to a multiple of this (autoencoder factor x patch / scale)."""
  need = config.autoencoder.factor * config.model.patch_size
  return max(1, math.ceil(need / config.data.scale))


def tile_count(config, size: tuple[int, int], *, tile: int | None = None,
               overlap: int | None = None) -> int:
  """Latent tiles the sampler runs for an LR image of ``(height, width)`` (from the config
  alone, so it is known before any model is built)."""
  m = lr_multiple(config)
  h, w = size
  return sampler.make_grid(config, (h + (-h % m), w + (-w % m)), tile=tile,
                           overlap=overlap).num_tiles


class WorkLimits:
  """What one input may cost, checked before the model loads: its pixels
  (``config.sampling.max_input_pixels``), its long side over its short side
  (``max_aspect_ratio``) and its tile count (``max_tiles``; 0: the tiles of the largest square
  input the pixel limit allows, at the trained tile size). The pixel limit alone does not bound
  the work: a 3 x 100000 image has few pixels but needs a tile per few of them. Each argument
  left None takes the run's config value."""

  def __init__(self, config, *, max_pixels: int | None = None, max_tiles: int | None = None,
               max_aspect_ratio: float | None = None):
    sc = config.sampling
    self.config = config
    self.max_pixels = image_io.check_limit(
        sc.get("max_input_pixels", image_io.DEFAULT_MAX_INPUT_PIXELS)
        if max_pixels is None else max_pixels, "max_input_pixels")
    ratio = sc.get("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO) if max_aspect_ratio is None \
        else max_aspect_ratio
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
      raise ValueError(f"max_aspect_ratio={ratio}: expected a number >= 1")
    self.max_aspect_ratio = float(ratio)
    tiles = sc.get("max_tiles", 0) if max_tiles is None else max_tiles
    if isinstance(tiles, bool) or int(tiles) != tiles or tiles < 0:
      raise ValueError(f"max_tiles={tiles}: expected an integer >= 0 (0: the tiles of the "
                       "largest square input)")
    side = math.isqrt(self.max_pixels)
    self.max_tiles = int(tiles) or tile_count(config, (side, side))

  def check(self, size: tuple[int, int], name: str = "input image", *, tile: int | None = None,
            overlap: int | None = None) -> int:
    """The tile count of an input of ``(height, width)``; ValueError naming ``name`` and what is
    allowed when it is over a limit."""
    h, w = size
    s = int(self.config.data.scale)
    if h * w > self.max_pixels:
      raise ValueError(
          f"{name}: {w}x{h} = {w * h:,} pixels, more than max_input_pixels={self.max_pixels} "
          "(config.sampling.max_input_pixels; --max_pixels); its "
          f"x{s} output would be {w * s}x{h * s}")
    n = tile_count(self.config, size, tile=tile, overlap=overlap)
    ratio = max(h, w) / max(1, min(h, w))
    if ratio > self.max_aspect_ratio:
      raise ValueError(
          f"{name}: {w}x{h} has an aspect ratio of {ratio:,.1f}:1 ({n:,} tiles for {w * h:,} "
          f"pixels), more than max_aspect_ratio={self.max_aspect_ratio:g} "
          "(config.sampling.max_aspect_ratio; --max_aspect_ratio); crop or split it")
    if n > self.max_tiles:
      raise ValueError(
          f"{name}: {w}x{h} needs {n:,} sampler tiles, more than max_tiles={self.max_tiles} "
          "(config.sampling.max_tiles, 0: the tiles of the largest square input; --max_tiles); "
          "use a smaller image or a larger --tile")
    return n
