"""The context-modality annotator: Canny edges, Depth Anything depth, Mask2Former segmentation and
a BLIP / Florence-2 / Qwen2.5-VL caption per image, written as ArrayRecord shards
(``mmsr_jax.formats.records``).

Maps are extracted from a reproducible Real-ESRGAN-degraded LR version of each image (the model
sees LR-derived maps at inference) unless ``from_hr``; they keep that image's size. Runs are
resumable shard by shard; a rerun with other inputs or settings is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from mmsr_jax.data import images, realesrgan, realesrgan_params, sources
from mmsr_jax.data.modalities import canny
from mmsr_jax.formats.records import MANIFEST, SHARD_PATTERN, encode_record

CAPTION_KINDS = ("blip", "florence2", "qwen2_5_vl")


DEFAULT_VLM_PROMPTS = {
    "florence2": "<MORE_DETAILED_CAPTION>",
    "qwen2_5_vl": "Describe this image in one sentence.",
}


def _normalise(x: np.ndarray) -> np.ndarray:
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros(x.shape, np.float32)
  return ((x - lo) / (hi - lo)).astype(np.float32)


def import_transformers():
  """Imports transformers (with torch) for the annotators.

  A torchvision wheel that does not match the installed torch fails on import and would make
  transformers refuse to load any vision model; such a broken torchvision is hidden (transformers
  then uses its PIL image processors), with a warning.
  """
  import sys
  import torch  # noqa: F401  (fails early, with the name, when torch is missing)
  if "transformers" not in sys.modules and "torchvision" not in sys.modules:
    try:
      import torchvision  # noqa: F401
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("ignoring the installed torchvision, which fails to import: %s", e)
      sys.modules["torchvision"] = None
  import transformers
  return transformers


def _check_model_path(field: str, path: str | None) -> None:
  """A local path must be an existing folder; anything else is taken as a hub id."""
  if not path:
    return
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise NotADirectoryError(f"annotator {field} model {path!r} is not a folder")
  elif path.startswith((".", "/", "~")) or path.count("/") > 1:
    raise FileNotFoundError(f"annotator {field} model folder {path!r} does not exist")


def _torchvision_usable() -> bool:
  """Whether torchvision imports (``import_transformers`` hides a broken one)."""
  import importlib.util
  import sys
  if "torchvision" in sys.modules:
    return sys.modules["torchvision"] is not None  # None: hidden by import_transformers
  return importlib.util.find_spec("torchvision") is not None


class QwenVLInputs:
  """Builds Qwen2.5-VL's model inputs from its image processor and tokenizer.

  transformers 5.x cannot construct ``Qwen2_5_VLProcessor`` without torchvision (the processor
  checks its video-processor slot against a class only exported with torchvision, even when no
  video processor is given), so without torchvision the annotator does the processor's image
  work itself: each image placeholder of the chat prompt is expanded to the image's number of
  merged patches (``grid_t * grid_h * grid_w / merge_size**2``), the texts are tokenised with
  left padding (a decoder-only batch must end at the same position), and the pixel patches and
  grids come from the image processor.
  """

  def __init__(self, tr, path: str):
    self.image_processor = tr.AutoImageProcessor.from_pretrained(path)
    self.tokenizer = tr.AutoTokenizer.from_pretrained(path)
    self.tokenizer.padding_side = "left"
    if not self.tokenizer.chat_template:
      raise ValueError(f"caption model {path!r}: the tokenizer has no chat template "
                       "(chat_template.jinja or tokenizer_config.json) to build the prompt from")
    self.image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
    if self.tokenizer.convert_tokens_to_ids(self.image_token) == self.tokenizer.unk_token_id:
      raise ValueError(f"caption model {path!r}: the tokenizer lacks the image token "
                       f"{self.image_token!r}")

  def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                          tokenize: bool = False) -> str:
    if tokenize:
      raise ValueError("QwenVLInputs.apply_chat_template gives the prompt text only")
    return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=False)

  def __call__(self, text: Sequence[str], images: Sequence[np.ndarray], padding: bool = True,
               return_tensors: str = "pt"):
    from transformers import BatchFeature  # pylint: disable=g-import-not-at-top
    pix = self.image_processor(images=list(images), return_tensors=return_tensors)
    merge = self.image_processor.merge_size ** 2
    expanded = []
    for t, grid in zip(text, pix["image_grid_thw"]):
      if t.count(self.image_token) != 1:
        raise ValueError(f"Qwen2.5-VL prompt must hold one {self.image_token!r}, got {t!r}")
      expanded.append(t.replace(self.image_token, self.image_token * (int(grid.prod()) // merge)))
    enc = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
    return BatchFeature({**enc, **pix})

  def batch_decode(self, ids, **kwargs) -> list[str]:
    return self.tokenizer.batch_decode(ids, **kwargs)


def _vlm_processor(tr, path: str, kind: str):
  """The processor of a prompted VLM; for Qwen2.5-VL without torchvision, ``QwenVLInputs``."""
  if kind == "qwen2_5_vl" and not _torchvision_usable():
    logging.warning("torchvision is not usable, so transformers cannot build the Qwen2.5-VL "
                    "processor; building its inputs from the image processor and tokenizer")
    return QwenVLInputs(tr, path)
  proc = tr.AutoProcessor.from_pretrained(path)
  if kind == "qwen2_5_vl":
    proc.tokenizer.padding_side = "left"  # decoder-only: a batch must end at the same position
  return proc


class Annotator:
  """Extracts the MMSR context modalities from RGB images with transformers models.

  Args:
    depth: local folder or hub id of a depth-estimation model (Depth Anything), or None.
    seg: local folder or hub id of a Mask2Former (semantic) model, or None.
    caption: local folder or hub id of an image-to-text model, or None.
    caption_kind: 'blip' (BLIP captioning), 'florence2' or 'qwen2_5_vl' (prompted VLMs).
    device: torch device string.
    caption_prompt: prompt for the prompted VLMs (a default per kind).
    max_new_tokens: caption length limit.
  """

  def __init__(self, depth: str | None = None, seg: str | None = None,
               caption: str | None = None, caption_kind: str = "blip", device: str = "cpu",
               caption_prompt: str | None = None, max_new_tokens: int = 40):
    if caption_kind not in CAPTION_KINDS:
      raise ValueError(f"caption_kind={caption_kind!r}: expected one of {CAPTION_KINDS}")
    for field, path in (("depth", depth), ("seg", seg), ("caption", caption)):
      _check_model_path(field, path)
    tr = import_transformers()
    self.device = device
    self.caption_kind = caption_kind
    self.max_new_tokens = int(max_new_tokens)
    self.model_ids = {"depth": depth, "seg": seg, "caption": caption}
    self.seconds: dict[str, float] = {}  # time spent per model, summed over calls
    self._depth = self._seg = self._cap = None
    if depth:
      self._depth = (tr.AutoImageProcessor.from_pretrained(depth),
                     tr.AutoModelForDepthEstimation.from_pretrained(depth).to(device).eval())
    if seg:
      self._seg = (tr.AutoImageProcessor.from_pretrained(seg),
                   tr.Mask2FormerForUniversalSegmentation.from_pretrained(seg).to(device).eval())
    if caption:
      if caption_kind == "blip":
        model = tr.BlipForConditionalGeneration.from_pretrained(caption)
        proc = tr.BlipProcessor.from_pretrained(caption)
      else:
        model = tr.AutoModelForImageTextToText.from_pretrained(caption)
        proc = _vlm_processor(tr, caption, caption_kind)
      self._cap = (proc, model.to(device).eval())
    self.caption_prompt = caption_prompt or DEFAULT_VLM_PROMPTS.get(caption_kind)

  @property
  def modalities(self) -> tuple[str, ...]:
    """The outputs this annotator produces (edge always)."""
    names = ["edge"]
    names += [n for n, m in (("depth", self._depth), ("seg", self._seg), ("caption", self._cap))
              if m is not None]
    return tuple(names)

  def annotate_one(self, image: np.ndarray) -> dict[str, Any]:
    """Annotates one uint8 HxWx3 RGB image (typically the LR input); see ``annotate_batch``."""
    return self.annotate_batch([image])[0]

  def annotate_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Annotates a batch of uint8 RGB images (sizes may differ).

    Returns one dict per image with ``'edge'`` (float32 HxW in {0, 1}, Canny), and, for the
    configured models, ``'depth'`` (float32 HxW in [0, 1], nearer = brighter, normalised per
    image), ``'seg'`` (int32 HxW class labels) and ``'caption'`` (str).
    """
    images = [self._check(i, x) for i, x in enumerate(images)]
    t = time.perf_counter()
    out = [{"edge": canny(x)} for x in images]
    t = self._clock("edge", t)
    for name, model, run in (("depth", self._depth, self._run_depth),
                             ("seg", self._seg, self._run_seg),
                             ("caption", self._cap, self._run_caption)):
      if model is not None:
        for o, v in zip(out, run(images)):
          o[name] = v
        t = self._clock(name, t)
    return out

  def _clock(self, name: str, start: float) -> float:
    """Adds the seconds since ``start`` to ``self.seconds[name]`` (the pipelines report the
    time per model); returns now."""
    now = time.perf_counter()
    self.seconds[name] = self.seconds.get(name, 0.0) + now - start
    return now

  @staticmethod
  def _check(i: int, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
      raise ValueError(f"annotator image {i}: expected uint8 HxWx3 RGB, got {x.dtype} {x.shape}")
    return x

  def _run_depth(self, images):
    """Depth per image; images of one size share a forward pass (Depth Anything's processor
    keeps the aspect ratio, so different sizes give different input shapes)."""
    res: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
      groups.setdefault(x.shape, []).append(i)
    for idx in groups.values():
      for i, d in zip(idx, self._run_depth_same_size([images[i] for i in idx])):
        res[i] = d
    return res

  def _run_depth_same_size(self, images):
    import torch
    proc, model = self._depth
    inputs = proc(images=list(images), return_tensors="pt").to(self.device)
    with torch.no_grad():
      pred = model(**inputs).predicted_depth  # [B, h, w], relative inverse depth (near = high)
    res = []
    for x, p in zip(images, pred):
      p = torch.nn.functional.interpolate(p[None, None].float(), size=x.shape[:2],
                                          mode="bilinear", align_corners=False)[0, 0]
      res.append(_normalise(p.cpu().numpy()))
    return res

  def _run_seg(self, images):
    import torch
    proc, model = self._seg
    inputs = proc(images=list(images), return_tensors="pt").to(self.device)
    with torch.no_grad():
      outputs = model(**inputs)
    maps = proc.post_process_semantic_segmentation(
        outputs, target_sizes=[x.shape[:2] for x in images])
    return [m.cpu().numpy().astype(np.int32) for m in maps]

  def _run_caption(self, images):
    import torch
    proc, model = self._cap
    if self.caption_kind == "blip":
      inputs = proc(images=list(images), return_tensors="pt").to(self.device)
    elif self.caption_kind == "florence2":
      inputs = proc(text=[self.caption_prompt] * len(images), images=list(images),
                    return_tensors="pt").to(self.device)
    else:  # qwen2_5_vl: chat template with one image and the prompt
      msgs = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": self.caption_prompt}]}]
      text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
      inputs = proc(text=[text] * len(images), images=list(images), padding=True,
                    return_tensors="pt").to(self.device)
    with torch.no_grad():
      ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    if self.caption_kind == "qwen2_5_vl":
      # The decoder-only VLM returns the prompt followed by the answer; Florence-2 (an
      # encoder-decoder) and BLIP return only the decoder's tokens.
      ids = ids[:, inputs["input_ids"].shape[1]:]
    texts = proc.batch_decode(ids, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


@dataclasses.dataclass
class _Input:
  """The images to annotate: a folder (recursive) or ``tfds:NAME[:SPLIT]``."""
  spec: str

  def open(self, data_dir: str = "", max_pixels: int = images.DEFAULT_MAX_PIXELS):
    if self.spec.startswith("tfds:"):
      parts = self.spec.split(":")
      if len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"--input={self.spec!r}: expected tfds:NAME or tfds:NAME:SPLIT")
      return sources.TfdsSource(parts[1], split=parts[2] if len(parts) == 3 else "train",
                                data_dir=data_dir or None)
    if not os.path.isdir(self.spec):
      raise FileNotFoundError(f"--input={self.spec!r}: no such folder (or use tfds:NAME)")
    return sources.FolderSource(self.spec, max_pixels, "--max_pixels")


SIZE_BUCKET = 256  # HR sizes are reflect-padded up to a multiple of this before degrading


def _lr_version(image: np.ndarray, index: int, preset: str, scale: int, seed: int) -> np.ndarray:
  """The degraded LR version of an image the modalities are extracted from (reproducible).

  The image (cropped to a multiple of ``scale``) is reflect-padded to a multiple of SIZE_BUCKET
  so that folders of many different sizes compile the jitted stages only a few times; the final
  resize maps the padded image to exactly 1/scale of it, so cropping the LR to
  (h/scale, w/scale) keeps exactly the original region.
  """
  h, w = image.shape[:2]
  h, w = h - h % scale, w - w % scale
  if min(h, w) < scale:
    raise ValueError(f"image of size {image.shape[:2]} is smaller than the scale {scale}")
  bucket = SIZE_BUCKET * scale // math.gcd(SIZE_BUCKET, scale)
  ph, pw = -(-h // bucket) * bucket, -(-w // bucket) * bucket
  hr = np.pad(image[:h, :w], ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric")
  lr = realesrgan.RealESRGANDegrader(preset, scale).degrade_one(
      hr.astype(np.float32) / np.float32(255.0), np.random.default_rng([seed, index]))
  return np.round(lr[:h // scale, :w // scale] * 255.0).astype(np.uint8)


def _manifest(n: int, size: int, settings: dict[str, Any]) -> dict[str, Any]:
  num = max(1, -(-n // size))
  return {"num_images": n, "shard_size": size, "num_shards": num, "settings": settings}


@dataclasses.dataclass
class AnnotateOptions:
  """What ``run_annotation`` does; the CLI flags carry the same names (see ``define_flags``)."""
  input: str
  output: str
  depth: str = ""
  seg: str = ""
  caption: str = ""
  caption_kind: str = "blip"
  from_hr: bool = False
  preset: str = "realesrgan"
  scale: int = 4
  seed: int = 0
  shard_size: int = 256
  batch_size: int = 8
  device: str = "cpu"
  tfds_data_dir: str = ""
  max_pixels: int = images.DEFAULT_MAX_PIXELS


def _check_headers(source, spec: str) -> None:
  """Reads every file's header (no decoding) before any model loads: an input of which no image
  can be used is an error; unusable ones are announced, then skipped and counted by the loop."""
  bad = []
  for path in source.files:
    try:
      images.header_size(path, source.max_pixels, "--max_pixels")
    except images.BadImage as e:
      bad.append(str(e))
  if bad and len(bad) == len(source.files):
    raise ValueError(f"--input={spec}: none of its {len(bad)} images can be used, e.g. {bad[0]}")
  if bad:
    print(f"{len(bad)} of {len(source.files)} images will be skipped, e.g. {bad[0]}")


def check_options(opts: AnnotateOptions) -> int:
  """The cheap checks of ``opts`` (before any model loads); returns the pixel limit."""
  if not opts.input or not opts.output:
    raise ValueError("--input and --output are required")
  realesrgan_params.get_preset(opts.preset)  # validate before anything long
  if opts.shard_size < 1 or opts.batch_size < 1:
    raise ValueError("--shard_size and --batch_size must be >= 1")
  if opts.caption_kind not in CAPTION_KINDS:
    raise ValueError(f"caption_kind={opts.caption_kind!r}: expected one of {CAPTION_KINDS}")
  return images.check_limit(opts.max_pixels, "--max_pixels")


def settings_of(opts: AnnotateOptions) -> dict[str, Any]:
  """What the manifest records of a run's settings (a rerun must match them)."""
  return {"input": opts.input, "depth": opts.depth, "seg": opts.seg,
          "caption": opts.caption, "caption_kind": opts.caption_kind,
          "from_hr": opts.from_hr, "preset": opts.preset, "scale": opts.scale,
          "seed": opts.seed}


def check_manifest(mpath: str, manifest: dict[str, Any], old: dict[str, Any] | None) -> None:
  """FileExistsError when an output folder holds a manifest of other inputs or settings."""
  if old is not None and old != manifest:
    raise FileExistsError(
        f"{mpath} was written for other inputs or settings ({old['settings']}, "
        f"{old['num_images']} images); use a new --output folder")


def annotator_of(opts: AnnotateOptions) -> "Annotator":
  return Annotator(depth=opts.depth or None, seg=opts.seg or None, caption=opts.caption or None,
                   caption_kind=opts.caption_kind, device=opts.device)


def annotate_indices(annotator: "Annotator", source, indices: Sequence[int],
                     opts: AnnotateOptions, max_pixels: int, on_batch=None
                     ) -> tuple[list[bytes], list[dict[str, Any]]]:
  """The records of the images ``indices`` of ``source`` (in that order, annotated in batches of
  ``opts.batch_size``) and the rejected ones, ``{'path', 'index', 'reason'}`` each: an image
  that cannot be read, is too large or smaller than the scale, or on which a model fails (a
  failing batch is annotated image by image to find it). ``on_batch(n)`` after each batch."""
  out: list[bytes] = []
  rejected: list[dict[str, Any]] = []

  def reject(i, name, reason):
    logging.warning("skipping %s: %s", name, reason)
    rejected.append({"path": name, "index": int(i), "reason": str(reason)})

  for b in range(0, len(indices), opts.batch_size):
    batch = []
    for i in indices[b:b + opts.batch_size]:
      name = source.files[i] if hasattr(source, "files") else f"{opts.input}[{i}]"
      try:
        rec = source[i]
        hr = rec["image"]
        if hr.shape[0] * hr.shape[1] > max_pixels:  # TFDS decodes before we can look
          raise images.BadImage(f"{hr.shape[0]}x{hr.shape[1]} is more than "
                                f"--max_pixels={max_pixels}")
        cond = hr if opts.from_hr else _lr_version(hr, i, opts.preset, opts.scale, opts.seed)
      except Exception as e:  # pylint: disable=broad-except
        # One bad file (unreadable, too large, too small) is rejected, never the whole run.
        reject(i, name, e)
        continue
      batch.append((i, name, rec, cond))
    try:
      outs = annotator.annotate_batch([c for *_, c in batch]) if batch else []
    except Exception:  # pylint: disable=broad-except
      outs = []
      for i, name, _, cond in list(batch):
        try:
          outs.append(annotator.annotate_one(cond))
        except Exception as e:  # pylint: disable=broad-except
          reject(i, name, f"annotator failed: {e}")
          outs.append(None)
    for (i, _, rec, cond), maps in zip(batch, outs):
      if maps is None:
        continue
      meta = {"name": rec["name"], "index": i, "image_size": list(rec["image"].shape[:2]),
              "maps_from": "hr" if opts.from_hr else "lr",
              "maps_size": list(cond.shape[:2]), "models": annotator.model_ids,
              "caption_kind": opts.caption_kind, "preset": opts.preset}
      if "caption" not in maps and rec.get("caption"):
        maps["caption"] = rec["caption"]  # the source's own caption when no model is given
      out.append(encode_record(rec["image"], maps, meta))
    if on_batch is not None:
      on_batch(len(indices[b:b + opts.batch_size]))
  return out, rejected


def write_shard(path: str, recs: Sequence[bytes]) -> None:
  """Writes ``recs`` as the ArrayRecord shard ``path`` (a local file)."""
  from array_record.python import array_record_module as arm  # pylint: disable=g-import-not-at-top
  # Uncompressed: the entries are PNG already; compression saves < 1 % and costs 4x the read CPU.
  writer = arm.ArrayRecordWriter(path, "group_size:1,uncompressed")
  for r in recs:
    writer.write(r)
  writer.close()


def run_annotation(opts: AnnotateOptions) -> dict[str, int]:
  """Annotates ``opts.input`` into ArrayRecord shards under ``opts.output`` in this process
  (resumable), shard after shard. ``mmsr_jax.data.beam_prepare.annotate`` runs the same work as
  an Apache Beam pipeline (what the command runs); this loop is its reference.

  Returns ``{'images', 'shards', 'already_done', 'written', 'skipped'}``.
  """
  F = opts  # noqa: N806
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  max_pixels = check_options(F)
  source = _Input(F.input).open(F.tfds_data_dir, max_pixels)
  if isinstance(source, sources.FolderSource):
    _check_headers(source, F.input)
  manifest = _manifest(len(source), F.shard_size, settings_of(F))
  os.makedirs(F.output, exist_ok=True)
  mpath = os.path.join(F.output, MANIFEST)
  if os.path.exists(mpath):
    with open(mpath) as f:
      check_manifest(mpath, manifest, json.load(f))
  else:
    with open(mpath, "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
  num = manifest["num_shards"]
  todo = [s for s in range(num)
          if not os.path.exists(os.path.join(F.output, SHARD_PATTERN.format(s, num)))]
  print(f"{len(source)} images, {num} shards, {num - len(todo)} already done")
  result = {"images": len(source), "shards": num, "already_done": num - len(todo),
            "written": 0, "skipped": 0}
  if not todo:
    return result
  annotator = annotator_of(F)
  size = manifest["shard_size"]
  bar = tqdm(total=sum(min(size, len(source) - s * size) for s in todo), unit="img")
  skipped = 0
  for s in todo:
    final = os.path.join(F.output, SHARD_PATTERN.format(s, num))
    indices = list(range(s * size, min(len(source), (s + 1) * size)))
    recs, rejected = annotate_indices(annotator, source, indices, F, max_pixels, bar.update)
    skipped += len(rejected)
    write_shard(final + ".tmp", recs)
    os.replace(final + ".tmp", final)
  bar.close()
  print(f"wrote {len(todo)} shards to {F.output} ({skipped} unreadable or too large images skipped)")
  return dict(result, written=len(todo), skipped=skipped)
