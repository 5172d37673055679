"""The conditioning of one input for the tiled sampler: user-supplied modality maps read and
resized onto the output grid, the LR padded to the model's (or the bucket's) multiple, and one
conditioning example per sampler tile, gathered into the sampler's inputs.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from mmsr_jax.data import images as image_io
from mmsr_jax.data.conditioning import conditioning_example
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion.tiles import TileGrid


def read_map(path: str, kind: str) -> np.ndarray:
  """A user-supplied modality map: float HxW in [0, 1] for depth/edge (8- or 16-bit greyscale or
  colour, which is turned into luma), integer labels HxW for seg (``L``, ``P``, ``I;16``, or the
  first channel of a colour image)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{kind}={path}: no such file")
  if kind != "seg":
    try:
      pic = image_io.read(path)
    except ValueError as e:
      raise ValueError(f"--{kind}={e}") from e
    return image_io.luma(pic.rgb)
  try:
    with Image.open(path) as im:
      arr = np.asarray(im)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"--{kind}={path}: not a readable image ({type(e).__name__}: {e})") from e
  arr = arr if arr.ndim == 2 else arr[..., 0]
  if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"--{kind}={path}: expected a non-empty integer label image, got "
                     f"{arr.dtype} {arr.shape}")
  return arr.astype(np.int32)


def resize_map(kind: str, m: np.ndarray, height: int, width: int) -> np.ndarray:
  """A whole-image map onto the output pixel grid (nearest for labels, so no label mixing)."""
  m = np.asarray(m)
  if m.shape[:2] == (height, width):
    return m
  if kind == "seg":
    return cv2.resize(m.astype(np.int32).astype(np.float32), (width, height),
                      interpolation=cv2.INTER_NEAREST).astype(np.int32)
  return cv2.resize(np.asarray(m, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def pad(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
  """``x`` padded by ``ph`` rows and ``pw`` columns at the bottom and right (reflected; repeated
  when a side is one pixel)."""
  pad = ((0, ph), (0, pw)) + ((0, 0),) * (x.ndim - 2)
  return np.pad(x, pad, mode="reflect" if min(x.shape[:2]) > 1 else "edge")


def tile_inputs(system, lr_rgb: np.ndarray, maps: dict[str, np.ndarray], caption: str,
                derive: tuple[str, ...], settings: dict) -> tuple[TileGrid, dict]:
  """The tile grid of ``lr_rgb`` (float HxWx3 in [0, 1]) and the sampler's inputs for it.

  ``maps`` are whole-image maps of any size (resized onto the output grid here); the missing
  maps named in ``derive`` are made from each tile's LR. ``settings`` are the checked settings
  of a call (``SuperResolver.resolve``): ``bucket``, ``tile``, ``tile_overlap``,
  ``negative_prompt``, ``temperature``, ``enabled``.
  """
  config = system.config
  h, w = lr_rgb.shape[:2]
  s = int(config.data.scale)
  m = settings["bucket"]
  ph, pw = -h % m, -w % m
  lr = pad(lr_rgb, ph, pw)
  grid = sampler.make_grid(config, lr.shape[:2], tile=settings["tile"],
                           overlap=settings["tile_overlap"])
  full_maps = {k: pad(resize_map(k, v, h * s, w * s), ph * s, pw * s)
               for k, v in maps.items()}
  f = system.conditioner.autoencoder.downsample
  th, tw = grid.tile_hw
  examples = []
  for r, c in grid.origins:
    ly, lx, lh, lw = r * f // s, c * f // s, th * f // s, tw * f // s
    tile_maps = {k: v[r * f:(r + th) * f, c * f:(c + tw) * f] for k, v in full_maps.items()}
    examples.append(conditioning_example(
        lr[ly:ly + lh, lx:lx + lw], tile_maps, caption, map_size=config.data.map_size,
        text_len=config.text.max_length, tokenizer=system.tokenizer, derive=derive))
  lr_full = np.asarray(lr, np.float32) * np.float32(2.0) - np.float32(1.0)
  inputs = sampler.make_inputs(
      examples, system.tokenizer, config, lr_images=lr_full[None], num_tiles=grid.num_tiles,
      negative_prompt=settings["negative_prompt"], temperature=settings["temperature"],
      enabled=settings["enabled"])
  return grid, inputs
