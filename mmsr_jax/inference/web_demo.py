"""One request of the web demo (``python -m mmsr_jax.app``) without the web: check an upload,
super-resolve it with the page's controls, write the PNG and its JSON sidecar (never over an
existing file), and make what the page shows beside it (bicubic, the maps the model was given).
The Gradio page itself is in ``mmsr_jax/app.py``; this module does not import Gradio."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import Any, Callable

import cv2
import numpy as np

from mmsr_jax.data import images as image_io
from mmsr_jax.data import modalities
from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.inference.tile_conditions import read_map

MAX_SEED = 2 ** 32 - 1  # seeds are 32-bit here so that any seed the page accepts is a valid key
DEFAULT_BUCKET = 64  # LR pixels: inputs whose sides round up to the same multiple share a compile


@dataclasses.dataclass
class Result:
  """What one request gives the page.

  Attributes:
    output: the x4 result (the input's kind: grey, alpha and bit depth kept).
    bicubic: the input bicubic-upsampled to the same size (the page's "before").
    maps: ``(uint8 HxWx3 picture, label)`` of each map the model was given, at the output size.
    record: the sidecar's content (every setting used, where each map came from).
    png, sidecar: the files written.
  """

  output: image_io.Picture
  bicubic: image_io.Picture
  maps: list[tuple[np.ndarray, str]]
  record: dict[str, Any]
  png: str
  sidecar: str


def _display_name(path: str) -> str:
  return os.path.basename(path) or path


def _without_path(message: str, path: str) -> str:
  """An error message naming the upload by its file name, not the server's temporary path."""
  return message.replace(path, _display_name(path))


class DemoSession:
  """The web demo's state: one :class:`SuperResolver` (weights loaded once, a compiled sampler
  per shape bucket), the output folder, and a lock so that requests run one at a time.

  Args:
    sr: the super-resolver.
    output_dir: where results and sidecars are written (created if missing).
    annotator: an :class:`mmsr_jax.data.annotator.Annotator` for depth / seg / caption the user
      does not give (as ``sample --annotate_*``), or None.
    max_pixels: largest input (pixels, checked from the file's header before decoding); None:
      the super-resolver's ``max_input_pixels``.
    bucket: LR sides are padded to a multiple of this (see ``SuperResolver.resolve``), so that
      a second image of similar size reuses the compiled sampler; None: no bucketing.
  """

  def __init__(self, sr: SuperResolver, output_dir: str, *, annotator=None,
               max_pixels: int | None = None, bucket: int | None = None):
    self.sr, self.annotator = sr, annotator
    self.max_pixels = image_io.check_limit(
        sr.max_input_pixels if max_pixels is None else max_pixels, "--max_pixels")
    sr.resolve(bucket=bucket)  # a bad bucket fails at start-up, not on the first request
    self.bucket = bucket
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
      raise NotADirectoryError(f"--output={output_dir} exists and is not a folder")
    os.makedirs(output_dir, exist_ok=True)
    self.output_dir = os.path.abspath(output_dir)
    self._lock = threading.Lock()

  # --- Checks (cheap; the page runs them on upload too).

  def read_input(self, path: str | None) -> image_io.Picture:
    """The uploaded image, refused from its header when over :attr:`max_pixels`."""
    if not path:
      raise ValueError("no input image: upload one first")
    try:
      pic = image_io.read(path, self.max_pixels, "--max_pixels")
      self.sr.check_input_size(pic.size, _display_name(path))
    except ValueError as e:
      raise ValueError(_without_path(str(e), path)) from e
    return pic

  def describe(self, pic: image_io.Picture) -> str:
    """One line about an input and the output it will give."""
    h, w = pic.size
    s = self.sr.scale_factor
    kind = ("grey" if pic.grey else "colour") + (" + alpha" if pic.alpha is not None else "")
    frames = (f"; an animation of {pic.frames} frames: only the first is used"
              if pic.frames > 1 else "")
    return f"{w}x{h} ({pic.mode}, {kind}, {pic.bits}-bit) -> {w * s}x{h * s}{frames}"

  def read_map(self, path: str, kind: str) -> np.ndarray:
    """A user-supplied map (as ``sample --depth/--seg/--edge``), checked from its header."""
    try:
      image_io.header_size(path, image_io.DEFAULT_MAX_PIXELS, f"the {kind} map's size")
    except ValueError as e:
      raise ValueError(f"{kind} map {_without_path(str(e), path)}") from e
    try:
      return read_map(path, kind)
    except ValueError as e:
      msg = _without_path(str(e), path).replace(f"--{kind}=", f"{kind} map ")
      raise ValueError(msg) from e

  def check_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
    """The effective settings (``SuperResolver.resolve``); a seed given as a float (the page's
    number field) must be a whole number in [0, :data:`MAX_SEED`] and becomes an int in
    ``settings``."""
    seed = settings.get("seed")
    if seed is not None:
      try:
        whole = float(seed) == int(float(seed))
      except (OverflowError, ValueError):
        whole = False
      if not whole or not 0 <= int(float(seed)) <= MAX_SEED:
        raise ValueError(f"seed={seed}: expected a whole number in [0, {MAX_SEED}]")
      settings["seed"] = int(float(seed))
    return self.sr.resolve(bucket=self.bucket, **settings)

  # --- One request.

  def run(self, path: str | None, *, caption: str | None = None,
          map_paths: dict[str, str | None] | None = None,
          progress: Callable[[int, int], None] | None = None, **settings) -> Result:
    """Super-resolves the upload at ``path`` with ``settings`` (those of
    ``SuperResolver.resolve``: guidance, scale, steps, seed, strength, negative_prompt,
    temperature, enabled, ...). ``caption`` None or blank: the annotator's if it captions, else
    none. ``progress(done, total)`` is called before the first DDIM step and after each.

    Every check (image, maps, settings) runs before any model work; ValueError names the field.
    """
    pic = self.read_input(path)
    maps = {k: self.read_map(p, k) for k, p in (map_paths or {}).items() if p}
    for k in maps:
      if k not in MODALITIES:
        raise ValueError(f"map {k!r}: expected one of {MODALITIES}")
    st = self.check_settings(settings)
    caption = caption if caption and caption.strip() else None
    annotated = {}
    if self.annotator is not None and (caption is None or
                                       any(k not in maps for k in ("depth", "seg"))):
      rgb8 = image_io.to_array(image_io.Picture(pic.rgb, None, False, 8))
      ann = self.annotator.annotate_one(rgb8)
      annotated = {k: ann[k] for k in ("depth", "seg") if k in ann and k not in maps}
      if caption is None and ann.get("caption"):
        caption = annotated["caption"] = ann["caption"]
    model_maps = {**maps, **{k: v for k, v in annotated.items() if k != "caption"}}

    total = self.sr.num_steps_run(st["steps"], st["strength"])
    done = [0]

    def step():
      done[0] += 1
      if progress is not None:
        progress(done[0], total)

    with self._lock:  # one model: requests take turns (the page's queue orders them)
      if progress is not None:
        progress(0, total)
      out, record = self.sr.upscale(pic, caption=caption, maps=model_maps, progress=step,
                                    bucket=self.bucket, **settings)
      for k in annotated:
        if k == "caption":
          record["caption_source"] = "annotator"
        else:
          record["maps"][k] = "annotator"
      png, sidecar = self._reserve(_display_name(path))
      image_io.write_png(png, out)
      record = {"input": _display_name(path), "output": png,
                "workdir": os.path.abspath(self.sr.workdir) if self.sr.workdir else None,
                "checkpoint_step": self.sr.step,
                "map_files": {k: _display_name(p) for k, p in (map_paths or {}).items() if p},
                **record}
      with open(sidecar, "w") as fh:
        json.dump(record, fh, indent=2)
    h, w = record["output_size"]
    rgb = bicubic_upsample(pic.rgb, (h, w))
    alpha = None if pic.alpha is None else image_io.upscale_alpha(pic.alpha, h, w)
    bicubic = image_io.Picture(rgb, alpha, pic.grey, pic.bits, pic.mode)
    return Result(out, bicubic, self.previews(pic, record, model_maps), record, png, sidecar)

  def _reserve(self, name: str) -> tuple[str, str]:
    """Fresh ``<stem>_sr<N>.png`` / ``.json`` paths in the output folder; the JSON is created
    here (exclusively), so two requests never get the same pair and nothing is overwritten."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(name)[0])[:80] or "image"
    n = 1
    while True:
      base = os.path.join(self.output_dir, f"{stem}_sr{n}")
      if not os.path.exists(base + ".png"):
        try:
          with open(base + ".json", "x"):
            pass
          return base + ".png", base + ".json"
        except FileExistsError:
          pass
      n += 1

  def previews(self, pic: image_io.Picture, record: dict, maps: dict[str, np.ndarray]
               ) -> list[tuple[np.ndarray, str]]:
    """The maps of a finished request as pictures at its output size, labelled with where each
    came from. Maps made from the LR (Canny edges; the operator maps of a run trained on them)
    are shown made from the whole bicubic-upsampled LR; the model makes them per tile."""
    h, w = record["output_size"]
    up = bicubic_upsample(image_io.to_array(image_io.Picture(pic.rgb, None, False, 8)), (h, w))
    enabled, sources = record["enabled"], record["maps"]
    derived = None
    out = []
    for k in MODALITIES:
      source = sources.get(k, "null")
      if source == "null" or not enabled.get(k, True):
        continue
      if k in maps:
        m = np.asarray(maps[k])
        if k == "seg":
          m = cv2.resize(m.astype(np.int32).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_NEAREST).astype(np.int32)
        else:
          m = cv2.resize(np.asarray(m, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
      elif k == "edge" and source.startswith("canny"):
        m = modalities.canny(up)
      else:
        if derived is None:
          derived = _operator_maps(up)
        m = derived[k]
      out.append((_picture(k, m), f"{k} ({source})"))
    return out


def _operator_maps(up: np.ndarray) -> dict[str, np.ndarray]:
  """``modalities.operator_maps`` of a non-square image at its own size (it takes a square:
  the image is edge-padded to one and the maps cropped back; the operators are local)."""
  h, w = up.shape[:2]
  side = max(h, w)
  square = np.pad(up, ((0, side - h), (0, side - w), (0, 0)), mode="edge")
  return {k: v[:h, :w] for k, v in modalities.operator_maps(square, side).items()}


def _picture(kind: str, m: np.ndarray) -> np.ndarray:
  """A map as uint8 RGB for display (depth / edges grey, segmentation in the model's palette)."""
  if kind == "seg":
    return modalities.colorize_seg(np.asarray(m, np.int64))
  grey = np.round(np.clip(np.asarray(m, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)
