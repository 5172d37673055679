"""The Python API of sampling: :class:`SuperResolver` super-resolves images of any mode and size
x4 with a run's EMA weights (latent tiling over all devices, the controls of the CLI, the text
encoder on the host for T5-XXL). Its parts: ``work_limits`` (what an input may cost),
``tile_conditions`` (maps and the per-tile conditioning), ``text_device`` (the host text
encoder)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from mmsr_jax.data import images as image_io
from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.diffusion import sampler
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.diffusion.tiles import TileGrid
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.inference.call_settings import resolve_settings
from mmsr_jax.inference.text_device import (HostTextEncoder, check_text_device,
                                            choose_text_device, text_param_bytes)
from mmsr_jax.inference.tile_conditions import tile_inputs
from mmsr_jax.inference.work_limits import WorkLimits, lr_multiple
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.system import System

class SuperResolver:
  """A trained MMSR model ready to super-resolve images (restores the newest checkpoint).

  The EMA parameters are replicated on a mesh of all devices; the tiles of every sampling step
  are split over it. ``annotator`` (an :class:`mmsr_jax.data.annotator.Annotator`, optional)
  supplies depth / segmentation / caption when a call does not.

  ``text_device`` (default ``config.sampling.text_device``, else ``"auto"``): ``"accelerator"``
  runs the text encoder inside the jitted sampler with the other frozen weights; ``"cpu"`` keeps
  its weights on the host CPU (:class:`~mmsr_jax.inference.text_device.HostTextEncoder`,
  :attr:`host_text`), computes the text states there once per distinct caption / negative
  prompt and hands them to the sampler as inputs, so T5-XXL (19 GB in float32) takes no
  accelerator memory; ``"auto"`` is ``"cpu"`` for a text encoder over 1 GiB on an accelerator
  backend. The DiT, VAE and VQ weights stay on the mesh in both modes.
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
    self.host_text: HostTextEncoder | None = None
    if self.text_device == "cpu":  # the sampler gets no text weights, only their states
      self.host_text = HostTextEncoder(system.conditioner, frozen["text"])
      frozen = {**frozen, "text": {}}
    self.frozen = frozen
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

  def resolve(self, **kwargs) -> dict[str, Any]:
    """The effective settings of a call (the run's defaults filled in), checked: every value
    that can be wrong is rejected here, before any image work (see
    :func:`~mmsr_jax.inference.call_settings.resolve_settings`)."""
    return resolve_settings(self.config, self.system.schedule.num_timesteps, **kwargs)

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
    maps, caption, sources, caption_source, derive = self._conditions(pic, caption, maps)
    grid, inputs = tile_inputs(self.system, pic.rgb, maps, caption, derive, st)
    guidance = st["guidance"] if st["scale"] else "none"
    h, w = pic.size
    s = self.scale_factor
    out = self._sample(grid, inputs, guidance, st, progress, (h * s, w * s))
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

  def _conditions(self, pic: image_io.Picture, caption: str | None,
                  maps: dict[str, np.ndarray] | None):
    """The maps and caption of a call, the annotator's for what the call lacks; where each came
    from; and the maps to derive from the LR per tile."""
    maps = dict(maps or {})
    for name in maps:
      if name not in MODALITIES:
        raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
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
    return maps, caption, sources, caption_source, derive

  def _sample(self, grid: TileGrid, inputs: dict, guidance: str, st: dict,
              progress: Callable[[], None] | None, out_hw: tuple[int, int]) -> np.ndarray:
    """The sampler's output for one input, in [-1, 1], without the padding (``out_hw``);
    FloatingPointError when it is not finite."""
    if self.host_text is not None:
      inputs = self.host_text.with_states(inputs, guidance)
    fn = self._sample_fn(grid, guidance, st["steps"], st["strength"], st["tile_batch"],
                         st["map_batch"])
    self._on_step = progress
    try:
      out = fn(self.params, self.frozen, inputs, jax.random.key(st["seed"]), st["scale"],
               st["eta"])
      out = np.asarray(jax.device_get(out))[0, :out_hw[0], :out_hw[1]]
    finally:
      self._on_step = None
    if not np.isfinite(out).all():  # clipped, NaN would be a black image
      where = f" (checkpoint {self.step} of {self.workdir})" if self.workdir else ""
      raise FloatingPointError(f"the sample holds NaN or infinite values: the weights{where} "
                               "are broken; nothing was written")
    return out


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
