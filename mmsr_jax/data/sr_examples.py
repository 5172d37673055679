"""SR training examples: random crops, degradation, modality maps and caption tokens, and the
deterministic, checkpointable Grain loader (example format: :func:`make_train_loader`).
"""

from __future__ import annotations

from typing import Any

import grain.python as pygrain
import ml_collections
import numpy as np

from mmsr_jax.data import realesrgan, realesrgan_params, sources
from mmsr_jax.data.conditioning import CaptionTokenizer, conditioning_example, context_example
from mmsr_jax.data.crops import crop, resize_min_side
from mmsr_jax.data.degrading_loader import DegradedLoader
from mmsr_jax.data.modalities import MODALITIES, operator_maps, render_crop_maps, render_map
from mmsr_jax.data.precomputed import (IDS_FROM_SHARDS_NEEDS, check_bank_meta, check_crops_meta,
                                       check_precomputed, padded_text_states, stored_array)
from mmsr_jax.data.simple_degradation import simple_degrade
from mmsr_jax.formats.records import HR_LATENTS_KEY, decode_crop


def build_example(image: np.ndarray, rendered: dict[str, np.ndarray], caption: str,
                  rng: np.random.Generator, *, scale: int, map_size: int, text_len: int,
                  tokenizer: CaptionTokenizer, degradation: str = "simple",
                  maps_from: str = "record") -> dict[str, np.ndarray]:
  """Degrades an HR crop and assembles the example dict (format: ``make_train_loader``);
  ``rendered`` holds the crop's depth / seg maps from ``render_crop_maps``. ``maps_from``
  (``config.data.maps_from``): 'lr' / 'hr' replace them and the edges with ``operator_maps``
  of the degraded LR / of the HR crop."""
  hr = image.astype(np.float32) / np.float32(255.0)
  if maps_from == "hr":
    rendered = {k: render_map(k, v, map_size) for k, v in operator_maps(image, map_size).items()}
  elif maps_from == "lr":
    rendered = {}
  if degradation == "simple":
    lr = simple_degrade(hr, rng, scale=scale)
  else:
    lr = realesrgan.RealESRGANDegrader(degradation, scale).degrade_one(hr, rng)
  example = conditioning_example(lr, {}, caption, map_size=map_size, text_len=text_len,
                                 tokenizer=tokenizer, rendered=rendered,
                                 derive=MODALITIES if maps_from == "lr" else ("edge",))
  example["hr"] = hr * np.float32(2.0) - np.float32(1.0)
  return example


class MakeTrainingExample(pygrain.RandomMapTransform):
  """Random crop + flip, degradation, modality maps and caption tokens for one record.

  All randomness comes from the ``rng`` grain hands to ``random_map`` (seeded per record index),
  so the output is a pure function of (seed, index).

  With ``ids_from='shards'`` the crop is one of the boxes of the record's token-id bank (written
  by ``python -m mmsr_jax.precompute --crop_size=hr_size``; ``sources.ArrayRecordSource`` passes it
  as ``'vq_bank'``), and the example gets that box's stored depth / seg ids as ``'vq_ids'``.
  A record with crop images (``'crops'``, see ``formats.records``) gives that box's stored crop
  and maps instead of a full image to cut it from: the same example, one small decode.
  """

  def __init__(self, hr_size: int, scale: int, map_size: int, text_len: int,
               tokenizer: CaptionTokenizer, degradation: str = "simple", ids_from: str = "encoder",
               vq_grid: int | None = None, maps_from: str = "record",
               text_from_shards: bool = False, latents_from_shards: bool = False):
    self.degradation = degradation
    self.maps_from = maps_from
    self.hr_size = int(hr_size)
    self.scale = int(scale)
    self.map_size = int(map_size)
    self.text_len = int(text_len)
    self.tokenizer = tokenizer
    self.ids_from = ids_from
    self.vq_grid = None if vq_grid is None else int(vq_grid)
    self.text_from_shards, self.latents_from_shards = text_from_shards, latents_from_shards
    # Precomputed features belong to the crop bank's boxes: the crop is one of them.
    self.from_bank = ids_from == "shards" or latents_from_shards

  def _bank(self, element: dict[str, Any]) -> dict[str, Any]:
    bank = element.get("vq_bank")
    name = element.get("name", "?")
    if bank is None:
      raise ValueError(f"record {name!r} has no token-id crop bank: "
                       f"{IDS_FROM_SHARDS_NEEDS}")
    check_bank_meta(bank["meta"], self.hr_size, self.map_size, self.vq_grid,
                    where=f"record {name!r}")
    return bank

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = self.hr_size
    crops = element.get("crops") if self.from_bank else None
    if crops is not None:
      check_crops_meta(crops["meta"], s, len(self._bank(element)["boxes"]),
                       where=f"record {element.get('name', '?')!r}")
      h, w = crops["meta"]["grid_hw"]
    else:
      rec = resize_min_side(element, self.hr_size)
      h, w = rec["image"].shape[:2]
    vq_ids = None
    if self.from_bank:
      bank = self._bank(element)
      box = int(rng.integers(0, len(bank["boxes"])))
      top, left = (int(v) for v in bank["boxes"][box])
      if not (0 <= top <= h - s and 0 <= left <= w - s):
        raise ValueError(f"record {element.get('name', '?')!r}: crop bank box ({top}, {left}) "
                         f"of side {s} lies outside the {h}x{w} image; precompute these shards "
                         "again")
    else:
      top = int(rng.integers(0, h - s + 1))
      left = int(rng.integers(0, w - s + 1))
    flip = bool(rng.random() < 0.5)
    if self.ids_from == "shards":
      vq_ids = bank["ids"][box, int(flip)].astype(np.int32)  # 0 where absent and for edge
    if crops is not None:  # the box's own crop and maps: a record whose frame is the box
      rec, top, left = dict(decode_crop(crops, box), caption=element["caption"]), 0, 0
    image = crop(rec["image"], top, left, s)
    if flip:
      image = image[:, ::-1]
    rendered = render_crop_maps(rec, top, left, s, flip, self.map_size)
    if self.degradation != "simple":
      ex = self._hr_and_params(image, rendered, rec["caption"], rng)
    else:
      ex = build_example(np.ascontiguousarray(image), rendered, rec["caption"], rng,
                          scale=self.scale, map_size=self.map_size, text_len=self.text_len,
                          tokenizer=self.tokenizer, maps_from=self.maps_from)
    if vq_ids is not None:
      ex["vq_ids"] = vq_ids
    if self.latents_from_shards:
      ex["hr_latent"] = stored_array(element["features"], HR_LATENTS_KEY)[box, int(flip)]
    if self.text_from_shards:
      ex["text_states"] = padded_text_states(element["features"], ex["text_mask"],
                                             where=element.get("name", "?"))
    return ex

  def _hr_and_params(self, image, rendered, caption, rng):
    """HR crop, context maps and tokens, and the sampled degradation parameters (``deg_*``);
    ``DegradingIterator`` turns them into 'lr' and 'edge' batch-wise."""
    maps = {"edge": np.zeros((1, 1), np.float32)}  # placeholder: computed from the LR later
    ex = context_example(maps, caption, map_size=self.map_size, text_len=self.text_len,
                         tokenizer=self.tokenizer, rendered=rendered)
    ex["hr"] = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    params = realesrgan_params.sample_params(rng, image.shape[:2], realesrgan_params.get_preset(
        self.degradation), self.scale)
    ex.update({f"deg_{k}": v for k, v in params.items()})
    return ex


def make_train_loader(config: ml_collections.ConfigDict, tokenizer: CaptionTokenizer):
  """The infinite, shuffled, per-process-sharded training loader (``get_state`` / ``set_state``
  on its iterator; saved with the checkpoints).

  Batches of examples (numpy; S = hr size, M = map size, L = text length): ``hr`` [S, S, 3] and
  ``lr`` [S/scale, S/scale, 3] in [-1, 1]; ``depth`` / ``seg`` / ``edge`` [M, M, 3] in [-1, 1]
  (zeros when absent); ``present`` bool [3]; ``text_ids`` / ``text_mask`` int32 [L]; with
  ``config.vq.ids_from='shards'`` also ``vq_ids`` int32 [3, g, g] from the record's crop bank
  (edge slot 0: edges are tokenized every step). Every example is a pure function of (seed,
  global record index), so batches repeat for the same seed and worker count. The Real-ESRGAN
  presets draw their parameters here and a ``DegradedLoader`` applies them batch-wise.
  """
  source_name = config.data.source
  degradation = config.data.degradation
  batch = sources.per_process_batch_size(config)
  ids_from = config.vq.ids_from
  source = sources.make_source(config, "train")
  vq_grid = None
  text_shards = config.text.states_from == "shards"
  latent_shards = config.autoencoder.hr_latents_from == "shards"
  if ids_from == "shards" or text_shards or latent_shards:
    vq_grid = check_precomputed(config, source)
  sampler = pygrain.IndexSampler(
      num_records=len(source),
      shard_options=pygrain.ShardByJaxProcess(drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=int(config.seed),
  )
  transform = MakeTrainingExample(
      hr_size=config.data.hr_size,
      scale=config.data.scale,
      map_size=config.data.map_size,
      text_len=config.text.max_length,
      tokenizer=tokenizer,
      degradation=degradation,
      ids_from=ids_from,
      vq_grid=vq_grid,
      text_from_shards=text_shards,
      latents_from_shards=latent_shards,
      maps_from=config.data.get("maps_from", "record"),
  )
  ops = [] if source_name == "demo" else [sources.DropBad()]
  loader = pygrain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=ops + [transform, pygrain.Batch(batch, drop_remainder=True)],
      worker_count=int(config.data.get("num_workers", 0)),
  )
  if degradation == "simple":
    return loader
  return DegradedLoader(loader, realesrgan.RealESRGANDegrader(degradation, config.data.scale),
                        config.data.map_size, int(config.data.get("prefetch", 2)))
