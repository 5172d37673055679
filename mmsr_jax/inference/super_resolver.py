"""The Python API of sampling: :class:`SuperResolver` super-resolves images of any mode and size
x4 with a run's EMA weights (latent tiling over all devices, the controls of the CLI, the text
encoder on the host for T5-XXL), and the helpers for user-supplied modality maps."""

from __future__ import annotations

import collections
import math
import os
import time
from typing import Any, Callable

import cv2
import jax
import numpy as np
from PIL import Image

from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.schema.sr import TEXT_DEVICES
from mmsr_jax.data import images as image_io
from mmsr_jax.data.conditioning import conditioning_example
from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.diffusion.tiles import TileGrid
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.system import System

# Settings a call may change; None = the run's config.sampling value.
SETTINGS = ("guidance", "scale", "steps", "eta", "seed", "strength", "negative_prompt")


# Where the frozen text encoder runs (config.sampling.text_device).



AUTO_HOST_TEXT_BYTES = 2 ** 30  # "auto": T5 weights above this stay on the host (T5-XXL: 19 GB)


TEXT_CACHE_SIZE = 8  # host text states kept per distinct token row (caption, negative, empty)
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


def host_device():
  """The host CPU device the text encoder uses in ``text_device='cpu'`` mode."""
  return jax.devices("cpu")[0]


def check_text_device(value: str) -> str:
  if value not in TEXT_DEVICES:
    raise ValueError(f"config.sampling.text_device={value!r}: expected one of {TEXT_DEVICES}")
  return value


def text_param_bytes(conditioner) -> int:
  """Bytes of the frozen text encoder's weights (from shapes only; nothing is allocated)."""
  shapes = conditioner.abstract_params("text")
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def choose_text_device(value: str, text_bytes: int) -> str:
  """``"accelerator"`` or ``"cpu"`` for a setting; ``"auto"`` keeps a text encoder larger than
  :data:`AUTO_HOST_TEXT_BYTES` on the host when the default backend is an accelerator."""
  if check_text_device(value) != "auto":
    return value
  big = text_bytes > AUTO_HOST_TEXT_BYTES
  return "cpu" if big and jax.default_backend() != "cpu" else "accelerator"


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


def _resize_map(kind: str, m: np.ndarray, height: int, width: int) -> np.ndarray:
  """A whole-image map onto the output pixel grid (nearest for labels, so no label mixing)."""
  m = np.asarray(m)
  if m.shape[:2] == (height, width):
    return m
  if kind == "seg":
    return cv2.resize(m.astype(np.int32).astype(np.float32), (width, height),
                      interpolation=cv2.INTER_NEAREST).astype(np.int32)
  return cv2.resize(np.asarray(m, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def _pad(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
  pad = ((0, ph), (0, pw)) + ((0, 0),) * (x.ndim - 2)
  return np.pad(x, pad, mode="reflect" if min(x.shape[:2]) > 1 else "edge")


class SuperResolver:
  """A trained MMSR model ready to super-resolve images (restores the newest checkpoint).

  The EMA parameters are replicated on a mesh of all devices; the tiles of every sampling step
  are split over it. ``annotator`` (an :class:`mmsr_jax.data.annotator.Annotator`, optional)
  supplies depth / segmentation / caption when a call does not.

  ``text_device`` (default ``config.sampling.text_device``, else ``"auto"``): ``"accelerator"``
  runs the text encoder inside the jitted sampler with the other frozen weights; ``"cpu"`` keeps
  its weights on the host CPU (:func:`host_device`), computes the text states there once per
  distinct caption / negative prompt (an LRU of :data:`TEXT_CACHE_SIZE` token rows) and hands
  them to the sampler as inputs, so T5-XXL (19 GB in float32) takes no accelerator memory;
  ``"auto"`` is ``"cpu"`` for a text encoder over 1 GiB on an accelerator backend. The DiT, VAE
  and VQ weights stay on the mesh in both modes.
  """

  def __init__(self, system: System, params, frozen: dict, *, step: int | None = None,
               workdir: str | None = None, annotator=None, text_device: str | None = None,
               max_input_pixels: int | None = None, max_tiles: int | None = None,
               max_aspect_ratio: float | None = None):
    self.system, self.config, self.params = system, system.config, params
    # Inputs over these are refused before any work (default: the run's config; runs saved
    # before the fields existed get the library defaults).
    self.limits = WorkLimits(self.config, max_pixels=max_input_pixels, max_tiles=max_tiles,
                             max_aspect_ratio=max_aspect_ratio)
    self.max_input_pixels = self.limits.max_pixels
    setting = self.config.sampling.text_device if text_device is None else text_device
    self.text_device = choose_text_device(setting, text_param_bytes(system.conditioner))
    self._text_params = None
    if self.text_device == "cpu":  # the sampler gets no text weights, only their states
      self._text_params = jax.device_put(frozen["text"], host_device())
      frozen = {**frozen, "text": {}}
      conditioner = system.conditioner
      self._host_text_fn = jax.jit(
          lambda p, ids, mask: conditioner.text_states({"text": p}, ids, mask))
    self.frozen = frozen
    self._text_cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
    self.text_cache_hits = self.text_cache_misses = 0
    self.mesh = system.mesh
    self.step, self.workdir, self.annotator = step, workdir, annotator
    self._fns: dict[tuple, Callable] = {}
    self._on_step: Callable[[], None] | None = None

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, devices=None,
                   annotator=None, text_device: str | None = None,
                   max_input_pixels: int | None = None, max_tiles: int | None = None,
                   max_aspect_ratio: float | None = None) -> "SuperResolver":
    """The run's EMA weights (only those are read from the checkpoint) on a data-parallel mesh
    of ``devices`` (default: all), with its frozen encoders."""
    config = ckpt_lib.load_config(workdir)
    sr_schema.validate(config)  # a run config the checks refuse is named before the checkpoints
    setting = check_text_device(config.sampling.get("text_device", "auto")
                                if text_device is None else text_device)
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoints; train first with "
                              "python -m mmsr_jax.train")
    devices = list(jax.devices() if devices is None else devices)
    config.unlock()
    config.mesh.data = len(devices)  # sampling splits tiles, not a training batch, over these
    config.mesh.fsdp = config.mesh.tensor = 1  # (the training run's mesh may have used them)
    config.batch_size = len(devices)
    system = System.from_config(config, devices)
    abstract = system.abstract_with_shardings()
    check_checkpoint_matches(ckpt, step, abstract, workdir)
    ema_params = ckpt.restore_part(step, "ema_params", abstract.ema_params)  # not the optimizer
    ckpt.close()
    where = choose_text_device(setting, text_param_bytes(system.conditioner))
    frozen = system.load_frozen(host_parts=("text",) if where == "cpu" else ())
    return cls(system, ema_params, frozen, step=int(step), workdir=workdir, annotator=annotator,
               text_device=where, max_input_pixels=max_input_pixels, max_tiles=max_tiles,
               max_aspect_ratio=max_aspect_ratio)

  # --- Settings.

  @property
  def lr_multiple(self) -> int:
    """LR sides are padded to a multiple of this (autoencoder factor x patch / scale)."""
    return lr_multiple(self.config)

  @property
  def scale_factor(self) -> int:
    return int(self.config.data.scale)

  def resolve(self, *, temperature: dict[str, float] | None = None,
              enabled: dict[str, bool] | None = None, tile: int | None = None,
              tile_overlap: int | None = None, tile_batch: int | None = None,
              map_batch: int | None = None, bucket: int | None = None,
              **settings) -> dict[str, Any]:
    """The effective settings of a call (the run's defaults filled in), checked: every value
    that can be wrong is rejected here, before any image work.

    ``bucket`` (LR pixels, rounded up to a multiple of :attr:`lr_multiple`): pad the LR sides
    to a multiple of it instead of the model's own multiple and crop the result back, so that
    inputs of nearby sizes share one padded size and so one compiled sampler (the web demo's
    shape buckets). None: the model's multiple, the least padding."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
      raise ValueError(f"unknown setting(s) {sorted(unknown)}; expected {SETTINGS}")
    sc = self.config.sampling
    out = {k: (sc[k] if settings.get(k) is None else settings[k]) for k in SETTINGS}
    guidance_lib.check(out["guidance"], allow_none=False)
    out["steps"], out["seed"] = int(out["steps"]), int(out["seed"])
    out["scale"], out["eta"], out["strength"] = (float(out[k]) for k in ("scale", "eta",
                                                                          "strength"))
    if not (math.isfinite(out["scale"]) and out["scale"] >= 0):
      raise ValueError(f"scale={out['scale']}: expected a finite value >= 0")
    if not 0.0 <= out["eta"] <= 1.0:
      raise ValueError(f"eta={out['eta']}: expected a value in [0, 1]")
    diffusion.ddim_timesteps(self.system.schedule.num_timesteps, out["steps"],
                             self.config.sampling.spacing)  # checks steps
    diffusion.check_strength(out["strength"])
    temps = {g: 1.0 for g in CONTEXT_GROUPS}
    for name, value in (temperature or {}).items():
      if name not in CONTEXT_GROUPS:
        raise ValueError(f"temperature for {name!r}: expected one of {CONTEXT_GROUPS}")
      if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"temperature {name}={value}: must be a finite value > 0")
      temps[name] = float(value)
    on = {g: True for g in CONTEXT_GROUPS}
    for name, value in (enabled or {}).items():
      if name not in CONTEXT_GROUPS:
        raise ValueError(f"modality switch {name!r}: expected one of {CONTEXT_GROUPS}")
      on[name] = bool(value)
    # Validates the tile geometry on a one-tile image.
    m = self.lr_multiple
    grid = sampler.make_grid(self.config, (m, m), tile=tile, overlap=tile_overlap)
    for name, value in (("tile_batch", tile_batch), ("map_batch", map_batch)):
      if value is not None and int(value) < 1:
        raise ValueError(f"{name}={value}: expected a positive number (or None: no limit)")
    if bucket is not None and int(bucket) < 1:
      raise ValueError(f"bucket={bucket}: expected a positive number of LR pixels (or None)")
    out.update(temperature=temps, enabled=on, tile=grid.tile, tile_overlap=grid.overlap,
               tile_batch=None if tile_batch is None else int(tile_batch),
               map_batch=None if map_batch is None else int(map_batch),
               bucket=m if bucket is None else -(-int(bucket) // m) * m)
    return out

  def _sample_fn(self, grid: TileGrid, guidance: str, steps: int, strength: float,
                 tile_batch: int | None = None, map_batch: int | None = None):
    key = (grid, guidance, steps, strength, tile_batch, map_batch)
    if key not in self._fns:
      self._fns[key] = sampler.make_sample_fn(
          self.system.model, self.system.conditioner, self.system.schedule, grid, steps=steps,
          guidance=guidance, spacing=self.config.sampling.spacing,
          clip_x0=self.config.sampling.clip_x0, strength=strength, mesh=self.mesh,
          progress=self._step_done, tile_batch=tile_batch, map_batch=map_batch)
    return self._fns[key]

  def _step_done(self) -> None:
    if self._on_step is not None:
      self._on_step()

  def _text_rows(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Host text states ``[n, L, D]`` of token rows ``[n, L]``, each row computed once on the
    host CPU and kept in a small LRU (the caption, negative prompt and empty caption repeat
    from image to image)."""
    rows = []
    for i, m in zip(np.asarray(ids), np.asarray(mask)):
      key = (i.dtype.str, i.tobytes(), m.dtype.str, m.tobytes())
      states = self._text_cache.get(key)
      if states is None:
        self.text_cache_misses += 1
        args = jax.device_put((i[None], m[None]), host_device())
        states = np.asarray(jax.device_get(self._host_text_fn(self._text_params, *args)))[0]
        self._text_cache[key] = states
        while len(self._text_cache) > TEXT_CACHE_SIZE:
          self._text_cache.popitem(last=False)
      else:
        self.text_cache_hits += 1
        self._text_cache.move_to_end(key)
      rows.append(states)
    return np.stack(rows)

  def _with_text_states(self, inputs: dict, guidance: str) -> dict:
    """Sampler inputs with host-computed ``states`` / ``states_mask`` (positive rows, then the
    negative branch's) in place of the token ids."""
    text = (inputs["text_ids"], inputs["text_mask"])
    if guidance != "none":
      (n_ids, n_mask), _ = guidance_lib.negative_branch(
          guidance, text, (inputs["neg_ids"], inputs["neg_mask"]),
          (inputs["null_ids"], inputs["null_mask"]), inputs["present"])
      text = (np.concatenate([text[0], n_ids]), np.concatenate([text[1], n_mask]))
    ids_keys = ("text_ids", "text_mask", "neg_ids", "neg_mask", "null_ids", "null_mask")
    out = {k: v for k, v in inputs.items() if k not in ids_keys}
    out["states"], out["states_mask"] = self._text_rows(*text), np.asarray(text[1])
    return out

  def check_input_size(self, size: tuple[int, int], name: str = "input image", *,
                       tile: int | None = None, overlap: int | None = None) -> None:
    """ValueError when ``(height, width)`` is over a limit of :attr:`limits` (pixels, aspect
    ratio, tiles with these tile settings)."""
    self.limits.check(size, name, tile=tile, overlap=overlap)

  def num_steps_run(self, steps: int, strength: float) -> int:
    """Denoiser steps a call really runs (about ``strength * steps`` when ``strength < 1``)."""
    return len(diffusion.sampling_timesteps(self.system.schedule.num_timesteps, steps,
                                            self.config.sampling.spacing, strength))

  # --- Super-resolution.

  def __call__(self, image, *, caption: str | None = None,
               maps: dict[str, np.ndarray] | None = None, **kwargs):
    """Super-resolves ``image`` (PIL image or array, any mode) -> the same kind, 4x the size.

    Keyword arguments: ``caption`` (None: the annotator's when it has a captioner, else empty),
    ``maps`` (``{'depth': HxW in [0, 1], 'seg': HxW labels, 'edge': HxW in [0, 1]}``, any size),
    and the settings of :meth:`resolve` (``guidance``, ``scale``, ``steps``, ``eta``, ``seed``,
    ``strength``, ``negative_prompt``, ``temperature``, ``enabled``, ``tile``,
    ``tile_overlap``, and the memory caps ``tile_batch`` / ``map_batch``).
    """
    pic = image_io.from_array(image)
    out, _ = self.upscale(pic, caption=caption, maps=maps, **kwargs)
    if isinstance(image, Image.Image):
      return image_io.to_pil(out)
    if isinstance(image, image_io.Picture):
      return out
    arr = np.asarray(image)
    res = image_io.to_array(out)
    if np.issubdtype(arr.dtype, np.floating):  # float in -> float in [0, 1] out
      top = 65535.0 if res.dtype == np.uint16 else 255.0
      res = res.astype(np.float32) / top
    if arr.ndim == 3 and arr.shape[2] == 1:
      res = res[..., None]
    return res

  def upscale(self, pic: image_io.Picture, *, caption: str | None = None,
              maps: dict[str, np.ndarray] | None = None,
              progress: Callable[[], None] | None = None,
              **kwargs) -> tuple[image_io.Picture, dict[str, Any]]:
    """Super-resolves a :class:`~mmsr_jax.data.images.Picture`; returns it with a record of what
    was used (settings, caption, where each map came from, tiles, time)."""
    t0 = time.time()
    self.check_input_size(pic.size)
    st = self.resolve(**kwargs)
    self.check_input_size(pic.size, tile=st["tile"], overlap=st["tile_overlap"])
    maps = dict(maps or {})
    for name in maps:
      if name not in MODALITIES:
        raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
    h, w = pic.size
    s = self.scale_factor
    sources = {k: "user" for k in maps}
    caption_source = "user" if caption is not None else "empty"
    if self.annotator is not None and (caption is None or
                                       any(k not in maps for k in ("depth", "seg"))):
      ann = self.annotator.annotate_one(image_io.to_array(
          image_io.Picture(pic.rgb, None, False, 8)))
      for k in ("depth", "seg"):
        if k in ann and k not in maps:
          maps[k], sources[k] = ann[k], "annotator"
      if caption is None and ann.get("caption"):
        caption, caption_source = ann["caption"], "annotator"
    caption = caption or ""
    # A run trained on operator maps (config.data.maps_from 'lr' or 'hr') gets them from the LR.
    derive = (("edge",) if self.config.data.get("maps_from", "record") == "record"
              else MODALITIES)
    for k in derive:
      sources.setdefault(k, "canny per tile" if derive == ("edge",) else "operators on the LR, "
                         "per tile")
    for k in MODALITIES:
      sources.setdefault(k, "null")

    # --- Pad to the model's multiple (or the bucket's); tile grid; per-tile conditions.
    m = st["bucket"]
    ph, pw = -h % m, -w % m
    lr = _pad(pic.rgb, ph, pw)
    grid = sampler.make_grid(self.config, lr.shape[:2], tile=st["tile"],
                            overlap=st["tile_overlap"])
    full_maps = {k: _pad(_resize_map(k, v, h * s, w * s), ph * s, pw * s)
                 for k, v in maps.items()}
    f = self.system.conditioner.autoencoder.downsample
    th, tw = grid.tile_hw
    examples = []
    for r, c in grid.origins:
      ly, lx, lh, lw = r * f // s, c * f // s, th * f // s, tw * f // s
      tile_maps = {k: v[r * f:(r + th) * f, c * f:(c + tw) * f] for k, v in full_maps.items()}
      examples.append(conditioning_example(
          lr[ly:ly + lh, lx:lx + lw], tile_maps, caption, map_size=self.config.data.map_size,
          text_len=self.config.text.max_length, tokenizer=self.system.tokenizer,
          derive=derive))
    lr_full = np.asarray(lr, np.float32) * np.float32(2.0) - np.float32(1.0)
    inputs = sampler.make_inputs(
        examples, self.system.tokenizer, self.config, lr_images=lr_full[None],
        num_tiles=grid.num_tiles,
        negative_prompt=st["negative_prompt"], temperature=st["temperature"],
        enabled=st["enabled"])

    # --- Sample.
    guidance = st["guidance"] if st["scale"] else "none"
    if self._text_params is not None:
      inputs = self._with_text_states(inputs, guidance)
    fn = self._sample_fn(grid, guidance, st["steps"], st["strength"], st["tile_batch"],
                         st["map_batch"])
    self._on_step = progress
    try:
      out = fn(self.params, self.frozen, inputs, jax.random.key(st["seed"]), st["scale"],
               st["eta"])
      out = np.asarray(jax.device_get(out))[0, : h * s, : w * s]
    finally:
      self._on_step = None
    if not np.isfinite(out).all():  # clipped, NaN would be a black image
      where = f" (checkpoint {self.step} of {self.workdir})" if self.workdir else ""
      raise FloatingPointError(f"the sample holds NaN or infinite values: the weights{where} "
                               "are broken; nothing was written")
    rgb = np.clip((out.astype(np.float32) + 1.0) * 0.5, 0.0, 1.0)
    alpha = None if pic.alpha is None else image_io.upscale_alpha(pic.alpha, h * s, w * s)
    result = image_io.Picture(rgb, alpha, pic.grey, pic.bits, pic.mode)
    record = dict(st, caption=caption, caption_source=caption_source, maps=sources,
                  negative_branch=guidance_lib.describe_negative(guidance,
                                                                 st["negative_prompt"]),
                  num_tiles=grid.num_tiles, latent_size=list(grid.latent_hw),
                  input_size=[h, w], output_size=[h * s, w * s], input_mode=pic.mode,
                  bits=pic.bits, alpha=pic.alpha is not None, grey=pic.grey,
                  devices=len(self.mesh.devices.flat), text_device=self.text_device,
                  seconds=round(time.time() - t0, 3))
    return result, record


def check_checkpoint_matches(ckpt: ckpt_lib.Checkpointer, step: int, abstract_state,
                             workdir: str) -> None:
  """One clear error when the checkpoint's arrays do not have the shapes the run's config.json
  gives (a config edited after training, or checkpoints copied from another run)."""
  if ckpt_lib.is_per_layer(os.path.join(ckpt.step_dir(step), "state")):
    return  # saved before the layers were scanned: the restore restacks and checks the shapes
  try:
    meta = ckpt.manager.item_metadata(step)["state"]
  except Exception:  # noqa: BLE001 - no metadata to compare: the restore itself will report
    return
  if meta is None:
    return
  saved = {ckpt_lib.path_name(p): tuple(getattr(v, "shape", ()) or ())
           for p, v in jax.tree_util.tree_leaves_with_path(meta)}
  for p, v in jax.tree_util.tree_leaves_with_path(abstract_state):
    key = ckpt_lib.path_name(p)
    want = tuple(v.shape)
    if key not in saved:
      raise ValueError(f"{os.path.join(ckpt.directory, str(step))}: has no array {key} that "
                       f"{ckpt_lib.config_path(workdir)} needs; the checkpoint does not match "
                       "the config")
    if saved[key] != want:
      raise ValueError(f"{os.path.join(ckpt.directory, str(step))}: array {key} has shape "
                       f"{saved[key]} but {ckpt_lib.config_path(workdir)} gives {want}; the "
                       "checkpoint does not match the config")




def parse_temperature(text: str) -> dict[str, float]:
  """``"depth=0.5,edge=2"`` -> ``{"depth": 0.5, "edge": 2.0}``."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = item.partition("=")
    name = name.strip()
    try:
      number = float(value)
    except ValueError:
      number = None
    if name not in CONTEXT_GROUPS or number is None:
      raise ValueError(f"--temperature item {item!r}: expected NAME=NUMBER with NAME in "
                       f"{CONTEXT_GROUPS}")
    out[name] = number
  return out
