"""Held-out SR examples: one centre crop per image, degraded with a seed from its name, so every
evaluation sees the same LR inputs.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import ml_collections
import numpy as np

from mmsr_jax.data import demo, sources
from mmsr_jax.data.conditioning import CaptionTokenizer
from mmsr_jax.data.crops import crop
from mmsr_jax.data.modalities import render_crop_maps
from mmsr_jax.data.sr_examples import build_example

EVAL_SEED = 1234
DEFAULT_EVAL_SIZE = 128


def _load_records(config: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
  """Held-out records: the images under config.data.eval_path for split 'val' when it is set,
  else the demo split (the held-out demo photos for every source)."""
  eval_path = config.data.get("eval_path", "")
  if split == "val" and eval_path:
    folder = sources.FolderSource(eval_path)
    records = []
    for i, path in enumerate(folder.files):
      try:
        records.append(dict(folder[i], name=os.path.relpath(path, eval_path)))
      except sources.BadImage as e:
        raise ValueError(f"config.data.eval_path image {path}: {e}") from e
    return records
  return demo.load_demo_records(split)


def _eval_seed(name: str) -> np.random.Generator:
  return np.random.default_rng([EVAL_SEED, zlib.crc32(name.encode("utf-8"))])


def make_eval_examples(config: ml_collections.ConfigDict, tokenizer: CaptionTokenizer,
                       split: str = "val") -> list[dict[str, Any]]:
  """Deterministic evaluation examples: one center crop per image of ``split``.

  The crop side is config.data.eval_size (default 128) clamped to the image's short side and
  rounded down to a multiple of config.data.scale. Each image is degraded with a fixed seed
  derived from its name (independent of config.seed), so every run sees the same LR inputs.

  Returns:
    A list of example dicts (unbatched; format as in training, with 'hr' [E, E, 3] and
    'lr' [E/scale, E/scale, 3]) plus 'name' and 'caption'.
  """
  degradation = config.data.degradation
  scale = int(config.data.scale)
  eval_size = int(config.data.get("eval_size", DEFAULT_EVAL_SIZE))
  examples = []
  for rec in _load_records(config, split):
    h, w = rec["image"].shape[:2]
    e = (min(eval_size, h, w) // scale) * scale
    if e <= 0:
      raise ValueError(f"image {rec['name']!r} ({h}x{w}) is smaller than scale={scale}")
    top, left = (h - e) // 2, (w - e) // 2
    ex = build_example(
        np.ascontiguousarray(crop(rec["image"], top, left, e)),
        render_crop_maps(rec, top, left, e, False, int(config.data.map_size)),
        rec["caption"], _eval_seed(rec["name"]), scale=scale,
        map_size=int(config.data.map_size), text_len=int(config.text.max_length),
        tokenizer=tokenizer, degradation=degradation,
        maps_from=config.data.get("maps_from", "record"))
    ex["name"] = rec["name"]
    ex["caption"] = rec["caption"]
    examples.append(ex)
  return examples
