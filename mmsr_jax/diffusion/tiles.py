"""Geometry of overlapping tiles and their raised-cosine blend (weights sum to exactly one, so an
input within one tile is unchanged), shared by the sampler's latent tiles and the tiled VAE.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Decoder / encoder tiles of the KL VAE (latent pixels): 64 = a 512 px output tile.
VAE_TILE, VAE_OVERLAP = 64, 16


def axis_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
  """Starts of tiles of length ``min(tile, size)`` covering ``[0, size)``.

  Neighbours share at least about ``overlap`` pixels; the tiles are spread evenly and every start
  is a multiple of ``align`` (the DiT patch size, so patches line up across tiles).
  """
  if size <= tile:
    return [0]
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap {overlap}: expected 0 <= overlap < tile ({tile})")
  n = math.ceil((size - overlap) / (tile - overlap))
  starts = [int(round(k * (size - tile) / (n - 1) / align)) * align for k in range(n)]
  starts[-1] = size - tile
  return sorted(set(starts))


def axis_window(starts: list[int], length: int) -> list[np.ndarray]:
  """Per-tile 1-D weights: 1 inside, raised-cosine ramps across each overlap with a neighbour.

  In an overlap the ramps of the two neighbours are sin^2 and cos^2 of the same angle (sampled at
  pixel centres), so they sum to one and the blend moves smoothly from one tile to the next.
  """
  out = []
  for k, s in enumerate(starts):
    w = np.ones(length, np.float64)
    i = np.arange(length) + 0.5
    if k > 0:
      ov = starts[k - 1] + length - s
      if ov > 0:
        w = np.minimum(w, np.where(i < ov, np.sin(0.5 * np.pi * i / ov) ** 2, 1.0))
    if k < len(starts) - 1:
      ov = s + length - starts[k + 1]
      if ov > 0:
        j = length - i  # distance to this tile's far end
        w = np.minimum(w, np.where(j < ov, np.sin(0.5 * np.pi * j / ov) ** 2, 1.0))
    out.append(w)
  return out


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Static geometry of the latent tiles of one image size (hashable; part of the jit key)."""

  latent_hw: tuple[int, int]
  tile: int
  overlap: int
  align: int = 1
  # Tile starts (rows, cols) when they are not the even spread of :func:`axis_starts`: set by
  # :meth:`scaled`, so a grid in output pixels keeps exactly the input grid's tiles.
  starts: tuple[tuple[int, ...], tuple[int, ...]] | None = None

  def __post_init__(self):
    if self.tile % self.align:
      raise ValueError(f"latent tile {self.tile} is not a multiple of the patch size {self.align}")
    if self.latent_hw[0] % self.align or self.latent_hw[1] % self.align:
      raise ValueError(f"latent {self.latent_hw} is not a multiple of the patch size {self.align}")

  @property
  def tile_hw(self) -> tuple[int, int]:
    return min(self.tile, self.latent_hw[0]), min(self.tile, self.latent_hw[1])

  @functools.cached_property
  def rows(self) -> list[int]:
    if self.starts is not None:
      return list(self.starts[0])
    return axis_starts(self.latent_hw[0], self.tile, self.overlap, self.align)

  @functools.cached_property
  def cols(self) -> list[int]:
    if self.starts is not None:
      return list(self.starts[1])
    return axis_starts(self.latent_hw[1], self.tile, self.overlap, self.align)

  def scaled(self, k: int) -> "TileGrid":
    """The same tiles measured in units ``k`` times smaller (e.g. latent -> output pixels).

    Not ``TileGrid(hw * k, tile * k, ...)``: spreading the tiles evenly over the larger size can
    round their starts differently (a 21-latent axis in 8-latent tiles starts at 0, 4, 9, 13 ->
    0, 16, 36, 52 pixels at x4, while an even spread of 84 pixels gives 0, 17, 35, 52), which
    would paste a tile's output a pixel away from where it belongs.
    """
    return TileGrid((self.latent_hw[0] * k, self.latent_hw[1] * k), self.tile * k,
                    self.overlap * k, 1,
                    (tuple(r * k for r in self.rows), tuple(c * k for c in self.cols)))

  @property
  def origins(self) -> list[tuple[int, int]]:
    """Top-left latent corners, row-major; the order of the tiles in every tile batch."""
    return [(r, c) for r in self.rows for c in self.cols]

  @property
  def num_tiles(self) -> int:
    return len(self.rows) * len(self.cols)

  def weights(self) -> np.ndarray:
    """``[n, th, tw, 1]`` float32 blend weights, normalised so they sum to 1 at every pixel."""
    th, tw = self.tile_hw
    wr, wc = axis_window(self.rows, th), axis_window(self.cols, tw)
    w = np.stack([wr[i][:, None] * wc[j][None, :]
                  for i in range(len(self.rows)) for j in range(len(self.cols))])
    total = np.zeros(self.latent_hw, np.float64)
    for (r, c), wk in zip(self.origins, w):
      total[r:r + th, c:c + tw] += wk
    norm = np.stack([wk / total[r:r + th, c:c + tw] for (r, c), wk in zip(self.origins, w)])
    return norm.astype(np.float32)[..., None]

  def gather(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> tiles ``[B * n, th, tw, C]`` (image-major)."""
    th, tw = self.tile_hw
    tiles = jnp.stack([x[:, r:r + th, c:c + tw] for r, c in self.origins], axis=1)
    return tiles.reshape(-1, th, tw, x.shape[-1])

  def blend(self, tiles: jax.Array, weights: jax.Array) -> jax.Array:
    """Inverse of :meth:`gather`: weighted sum of the tiles ``[B * n, th, tw, C]`` -> latent."""
    th, tw = self.tile_hw
    n = self.num_tiles
    tiles = tiles.reshape(-1, n, th, tw, tiles.shape[-1]) * weights[None].astype(tiles.dtype)
    out = jnp.zeros((tiles.shape[0], *self.latent_hw, tiles.shape[-1]), tiles.dtype)
    for k, (r, c) in enumerate(self.origins):
      out = out.at[:, r:r + th, c:c + tw].add(tiles[:, k])
    return out


def vae_tiled(fn: Callable[[jax.Array], Any], x: jax.Array, *, unit_in: int, unit_out: int,
              tile: int = VAE_TILE, overlap: int = VAE_OVERLAP) -> Any:
  """``fn`` (an encode or decode) on overlapping ``tile``-unit tiles of NHWC ``x``, run one tile
  after another (``lax.map``: one tile's activations live at a time) and blended with the same
  normalised raised-cosine window as the denoiser tiles. Traceable (jit it).

  A unit is ``unit_in`` input and ``unit_out`` output pixels (decode: 1 and the upsampling factor;
  encode: the factor and 1), ``tile`` and ``overlap`` are in units. ``fn`` may return one array
  or a pytree of NHWC arrays (e.g. ``(mean, logvar)``); each is blended. An input within one tile
  gives ``fn(x)`` (as float32).
  """
  if not 0 <= overlap < tile:
    raise ValueError(f"tiling: need 0 <= overlap ({overlap}) < tile ({tile})")
  _, h_in, w_in, _ = x.shape
  if h_in % unit_in or w_in % unit_in:
    raise ValueError(f"tiling: input {h_in}x{w_in} is not divisible by {unit_in}")
  lat = (h_in // unit_in, w_in // unit_in)
  grid = TileGrid(lat, tile, overlap)
  if grid.num_tiles == 1:
    return jax.tree.map(lambda o: o.astype(jnp.float32), fn(x))
  out_grid = grid.scaled(unit_out)
  weights = jnp.asarray(out_grid.weights())
  th, tw = grid.tile_hw
  tiles = jnp.stack([x[:, r * unit_in:(r + th) * unit_in, c * unit_in:(c + tw) * unit_in]
                     for r, c in grid.origins])  # [n, B, ...]

  def blend(o):  # [n, B, th * unit_out, tw * unit_out, C] -> the whole output
    o = jnp.swapaxes(o, 0, 1).reshape(-1, *o.shape[2:])  # image-major, as blend expects
    return out_grid.blend(o.astype(jnp.float32), weights)

  return jax.tree.map(blend, jax.lax.map(fn, tiles))


def tiled_decode(apply_decode: Callable[[jax.Array], jax.Array], z: jax.Array, *, factor: int = 8,
                 tile_latent: int = 64, overlap_latent: int = 16) -> jax.Array:
  """Decodes ``z [B, h, w, c]`` on overlapping latent tiles (:func:`vae_tiled`:
  one tile at a time, raised-cosine blend).

  Args:
    apply_decode: latent -> image ``[B, h'*factor, w'*factor, C]`` for any tile size.
    z: the latent.
    factor: the decoder's upsampling factor.
    tile_latent: tile side in latent pixels.
    overlap_latent: latent pixels shared by neighbouring tiles.

  A latent within one tile gives exactly ``apply_decode(z)`` (as float32). Elsewhere the result
  differs a little from the untiled decode (border padding, per-tile group-norm statistics and
  attention), but the blend hides the seams.
  """
  return vae_tiled(apply_decode, z, unit_in=1, unit_out=factor, tile=tile_latent,
                             overlap=overlap_latent)


def tiled_encode(apply_encode: Callable[[jax.Array], Any], x: jax.Array, *, factor: int = 8,
                 tile_latent: int = 64, overlap_latent: int = 16) -> Any:
  """Encodes ``x [B, H, W, C]`` on overlapping tiles (sides in latent pixels) and blends them.

  ``apply_encode`` may return one array or a pytree of latents (e.g. ``(mean, logvar)``); each
  is blended. ``H`` and ``W`` must be multiples of ``factor``. An image within one tile gives
  exactly ``apply_encode(x)`` (as float32).
  """
  return vae_tiled(apply_encode, x, unit_in=factor, unit_out=1, tile=tile_latent,
                             overlap=overlap_latent)
