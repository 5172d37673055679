r"""Super-resolves images x4 with a trained run's EMA weights.

  python -m mmsr_jax.sample --workdir=runs/tiny --input=photo.png --output=out/

``--input`` is an image file or a folder of images. Every setting of the run's config can be
changed per call: guidance mode and scale, steps, eta, seed, caption and negative prompt,
per-modality temperature (``--temperature=depth=0.5,edge=2``), switches (``--disable=depth,seg``)
and user-supplied maps (``--depth=FILE``, ``--seg=FILE``, ``--edge=FILE``). Edges are extracted
from the LR input by Canny when not given; depth and segmentation are null unless given.

The Python API, used by this CLI::

  sr = SuperResolver.from_workdir("runs/tiny")
  out = sr(lr_uint8, caption="a cat", temperature={"depth": 0.5}, guidance="mcfg", scale=2.0)
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from absl import app, flags
from PIL import Image, ImageOps

from mmsr_jax import checkpoint as ckpt_lib
from mmsr_jax import diffusion, sampler
from mmsr_jax.data import pipeline
from mmsr_jax.models.context import CONTEXT_GROUPS, SPATIAL_MODALITIES
from mmsr_jax.report import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB (EXIF orientation applied); one clear error otherwise."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      im.load()
      arr = np.asarray(im.convert("RGB"))
  except Exception as e:  # noqa: BLE001 - PIL raises several types for bad files
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{path}: the image has zero size {arr.shape[:2]}")
  return arr


def read_map(path: str, kind: str) -> np.ndarray:
  """A user-supplied modality map: grey in [0, 1] for depth/edge, integer labels for seg."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{kind}={path}: no such file")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert("L") if kind != "seg" else im)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"--{kind}={path}: not a readable image ({e})") from e
  if kind == "seg":
    return arr if arr.ndim == 2 else arr[..., 0]
  return arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)


class SuperResolver:
  """A trained MMSR model ready to super-resolve images (restores the newest checkpoint)."""

  def __init__(self, config, params, trainer):
    self.config, self.params, self._t = config, params, trainer
    self._fns = {}

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None) -> "SuperResolver":
    from mmsr_jax.train import Trainer  # the trainer builds the same model, encoders and state
    config = ckpt_lib.load_config(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoints; train first with "
                              "python -m mmsr_jax.train")
    config.unlock()
    config.mesh.data = 1
    trainer = Trainer(config, workdir, devices=jax.devices()[:1])
    state = ckpt.restore(step, trainer.abstract_with_shardings())
    ckpt.close()
    return cls(config, state.ema_params, trainer)

  @property
  def lr_multiple(self) -> int:
    """LR sides are padded to a multiple of this (autoencoder factor x patch / scale)."""
    need = self._t.conditioner.autoencoder.downsample * self.config.model.patch_size
    return max(1, math.ceil(need / self.config.data.scale))

  def _sample_fn(self, guidance: str, steps: int, strength: float):
    key = (guidance, steps, strength)
    if key not in self._fns:
      self._fns[key] = sampler.make_sample_fn(
          self._t.model, self._t.conditioner, self._t.schedule, steps=steps, guidance=guidance,
          spacing=self.config.sampling.spacing, clip_x0=self.config.sampling.clip_x0,
          strength=strength)
    return self._fns[key]

  def __call__(self, image: np.ndarray, *, caption: str = "", negative_prompt: str | None = None,
               guidance: str | None = None, scale: float | None = None, steps: int | None = None,
               eta: float | None = None, seed: int | None = None,
               strength: float | None = None,
               temperature: dict[str, float] | None = None,
               enabled: dict[str, bool] | None = None,
               maps: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """``image`` uint8 HxWx3 -> uint8 (4H)x(4W)x3."""
    sc = self.config.sampling
    guidance = sc.guidance if guidance is None else guidance
    scale = sc.scale if scale is None else scale
    steps = sc.steps if steps is None else steps
    if guidance not in diffusion.GUIDANCE_MODES + ("none",):
      raise ValueError(f"guidance={guidance!r}: expected one of {diffusion.GUIDANCE_MODES}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    m = self.lr_multiple
    ph, pw = -h % m, -w % m
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    example = self._example(padded, caption, maps or {})
    inputs = sampler.make_inputs([example], self._t.tokenizer, self.config,
                                 negative_prompt=negative_prompt, temperature=temperature,
                                 enabled=enabled)
    strength = sc.strength if strength is None else strength
    diffusion.start_step(steps, strength)  # validates the value before any work
    fn = self._sample_fn(guidance if scale else "none", steps, strength)
    out = fn(self.params, self._t.frozen, inputs,
             jax.random.key(sc.seed if seed is None else seed), float(scale),
             float(sc.eta if eta is None else eta))
    s = self.config.data.scale
    return to_uint8(out[0])[: h * s, : w * s]

  def _example(self, lr_u8: np.ndarray, caption: str, maps: dict[str, np.ndarray]) -> dict:
    return pipeline.conditioning_example(
        lr_u8.astype(np.float32) / 255.0, maps, caption, map_size=self.config.data.map_size,
        text_len=self.config.text.max_length, tokenizer=self._t.tokenizer)


def parse_temperature(text: str) -> dict[str, float]:
  """``"depth=0.5,edge=2"`` -> ``{"depth": 0.5, "edge": 2.0}``."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = item.partition("=")
    if name not in CONTEXT_GROUPS or not value:
      raise ValueError(f"--temperature item {item!r}: expected NAME=VALUE with NAME in "
                       f"{CONTEXT_GROUPS}")
    out[name] = float(value)
  return out


def list_inputs(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise FileNotFoundError(f"--input={path}: the folder holds no images {IMAGE_SUFFIXES}")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input={path}: no such file or folder")
  return [path]


def define_flags() -> None:
  """Flags of the CLI (defined only when run as a program, so importing stays side-effect free)."""
  d = flags
  d.DEFINE_string("workdir", None, "Training run directory (config + checkpoints).")
  d.DEFINE_string("input", None, "An image file or a folder of images.")
  d.DEFINE_string("output", None, "Output folder for the x4 PNGs.")
  d.DEFINE_string("caption", "", "Caption for every input.")
  d.DEFINE_string("negative_prompt", None, "Negative prompt (default: the config's).")
  d.DEFINE_enum("guidance", None, list(diffusion.GUIDANCE_MODES), "Guidance mode.")
  d.DEFINE_float("scale", None, "Guidance scale w (0: conditional only).")
  d.DEFINE_integer("steps", None, "DDIM steps.")
  d.DEFINE_float("eta", None, "DDIM eta.")
  d.DEFINE_integer("seed", None, "Noise seed.")
  d.DEFINE_float("strength", None, "1 = from pure noise; < 1 = from the noised upsampled LR.")
  d.DEFINE_string("temperature", "", "Per-group temperature, e.g. depth=0.5,edge=2.")
  d.DEFINE_list("disable", [], "Groups to switch off: text, depth, seg, edge.")
  for k in SPATIAL_MODALITIES:
    d.DEFINE_string(k, None, f"User-supplied {k} map (image file).")
  d.DEFINE_bool("overwrite", False, "Replace existing outputs.")


def main(argv):
  del argv
  F = flags.FLAGS
  for name in ("workdir", "input", "output"):
    if not F[name].value:
      raise app.UsageError(f"--{name} is required")
  # Every check on the inputs happens before the model is built or compiled.
  files = list_inputs(F.input)
  images = {f: read_image(f) for f in files}
  maps = {k: read_map(F[k].value, k) for k in SPATIAL_MODALITIES if F[k].value}
  temperature = parse_temperature(F.temperature)
  for name in F.disable:
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"--disable={name}: expected names from {CONTEXT_GROUPS}")
  enabled = {name: False for name in F.disable}
  targets = {f: os.path.join(F.output, os.path.splitext(os.path.basename(f))[0] + ".png")
             for f in files}
  existing = [t for t in targets.values() if os.path.exists(t)]
  if existing and not F.overwrite:
    raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass "
                          "--overwrite to replace")
  ckpt_lib.load_config(F.workdir)  # fails early on a folder that is not a run

  sr = SuperResolver.from_workdir(F.workdir)
  os.makedirs(F.output, exist_ok=True)
  settings = dict(caption=F.caption, negative_prompt=F.negative_prompt, guidance=F.guidance,
                  scale=F.scale, steps=F.steps, eta=F.eta, seed=F.seed, strength=F.strength,
                  temperature=temperature, enabled=enabled)
  sc = sr.config.sampling  # unset flags take the run's config values; the sidecar shows them
  settings = {k: (sc[k] if v is None and k in sc else v) for k, v in settings.items()}
  for i, (f, img) in enumerate(images.items()):
    out = sr(img, maps=maps, **settings)
    Image.fromarray(out).save(targets[f])
    with open(os.path.splitext(targets[f])[0] + ".json", "w") as fh:
      json.dump({"input": f, "workdir": F.workdir,
                 **{k: v for k, v in settings.items()},
                 "maps": sorted(maps), "input_size": list(img.shape[:2]),
                 "output_size": list(out.shape[:2])}, fh, indent=2)
    print(f"[{i + 1}/{len(images)}] {f} {img.shape[1]}x{img.shape[0]} -> {targets[f]} "
          f"{out.shape[1]}x{out.shape[0]}", flush=True)


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
