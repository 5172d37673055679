"""The model's conditioning for one LR image (the LR, rendered modality maps, ``present`` and
caption tokens): built the same way for training examples and for each tile at inference.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mmsr_jax.data.modalities import MODALITIES, canny_edges, operator_maps, render_map


class CaptionTokenizer(Protocol):
  """What the pipeline needs from a caption tokenizer."""

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    ...


def context_example(maps: dict[str, np.ndarray], caption: str, *, map_size: int, text_len: int,
                    tokenizer: CaptionTokenizer,
                    rendered: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Rendered maps (zeros when absent), ``present`` and caption tokens; no LR-derived part.

  ``maps`` holds raw maps (rendered here); ``rendered`` maps already rendered at ``map_size``
  (``render_crop_maps``).
  """
  rendered = dict(rendered or {})
  for name in list(maps) + list(rendered):
    if name not in MODALITIES:
      raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
  for k, v in maps.items():
    if k in rendered:
      raise ValueError(f"map {k!r} given both raw and rendered")
    rendered[k] = render_map(k, v, map_size)
  ids, mask = tokenizer.encode(caption, text_len)
  return {
      **{k: (rendered[k] if k in rendered
             else np.zeros((map_size, map_size, 3), np.float32)) for k in MODALITIES},
      "present": np.array([k in rendered for k in MODALITIES], np.bool_),
      "text_ids": np.asarray(ids, np.int32).reshape(text_len),
      "text_mask": np.asarray(mask, np.int32).reshape(text_len),
  }


def conditioning_example(lr: np.ndarray, maps: dict[str, np.ndarray], caption: str, *,
                         map_size: int, text_len: int, tokenizer: CaptionTokenizer,
                         rendered: dict[str, np.ndarray] | None = None,
                         derive: tuple[str, ...] = ("edge",)) -> dict[str, np.ndarray]:
  """The model's conditioning for one LR image, shared by training and sampling.

  ``lr`` is float HxWx3 in [0, 1]; ``maps`` holds the raw modality maps that exist (``depth``
  HxW in [0, 1], ``seg`` HxW labels, ``edge`` HxW in [0, 1]); the missing maps named in
  ``derive`` are made from ``lr`` (edges by Canny, all three by ``operator_maps`` when
  ``config.data.maps_from='lr'``). Returns ``lr`` in [-1, 1], the rendered maps (zeros when
  absent), ``present`` and the caption's ``text_ids`` / ``text_mask``. ``rendered`` holds maps
  already rendered at ``map_size`` (``render_crop_maps``).
  """
  for name in maps:
    if name not in MODALITIES:
      raise ValueError(f"map {name!r}: expected one of {MODALITIES}")
  if not set(derive) <= set(MODALITIES):
    raise ValueError(f"derive={derive!r}: expected names from {MODALITIES}")
  missing = [k for k in derive if k not in maps and k not in (rendered or {})]
  if missing == ["edge"]:
    maps = dict(maps, edge=canny_edges(lr, map_size))
  elif missing:
    made = operator_maps(lr, map_size)
    maps = dict(maps, **{k: made[k] for k in missing})
  example = {"lr": np.asarray(lr, np.float32) * np.float32(2.0) - np.float32(1.0)}
  example.update(context_example(maps, caption, map_size=map_size, text_len=text_len,
                                 tokenizer=tokenizer, rendered=rendered))
  return example
