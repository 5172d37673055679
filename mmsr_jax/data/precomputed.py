"""Features that the precompute pass stored in the shards (token-id crop banks, crop images, caption
states, HR latents): the checks that they match the config before training, and their reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from mmsr_jax.data import sources
from mmsr_jax.formats.fingerprint import encoder_fingerprint
from mmsr_jax.formats.records import (HR_LATENTS_KEY, NULL_TEXT_FILE, TEXT_STATES_KEY,
                                      list_shards, read_crop_bank, read_crops, read_features)

IDS_FROM_SHARDS_NEEDS = (
    "config.vq.ids_from='shards' needs config.data.source='arrayrecord' with shards written by "
    "python -m mmsr_jax.precompute --crop_size=...")


def check_crops_meta(meta: dict[str, Any], hr_size: int, boxes: int, *, where: str) -> None:
  """ValueError unless a record's crop images belong to its bank at the config's crop size."""
  if int(meta["crop_size"]) != hr_size or int(meta["boxes"]) != boxes:
    raise ValueError(f"{where}: {meta['boxes']} crop images of {meta['crop_size']}px do not match "
                     f"its crop bank ({boxes} boxes) at config.data.hr_size={hr_size}; run "
                     f"python -m mmsr_jax.precompute --crop_size={hr_size} again")


def check_bank_meta(meta: dict[str, Any], hr_size: int, map_size: int, grid: int | None, *,
                    where: str) -> None:
  """ValueError unless a crop bank's ``vq_meta`` matches the DiT config's sizes."""
  crop = int(meta.get("crop_size", 0))
  if crop != hr_size:
    raise ValueError(f"{where}: token-id crop bank of {crop}px crops != config.data.hr_size="
                     f"{hr_size}; run python -m mmsr_jax.precompute --crop_size={hr_size}")
  if int(meta["map_size"]) != map_size:
    raise ValueError(f"{where}: shards tokenized at map_size={meta['map_size']} != "
                     f"config.data.map_size={map_size}; tokenize with a tokenizer trained at "
                     f"map_size={map_size}")
  if grid is not None and int(meta["grid"]) != grid:
    raise ValueError(f"{where}: token grid {meta['grid']}x{meta['grid']} != the model's "
                     f"{grid}x{grid} (config.vq.arch); tokenize with the tokenizer the config "
                     "uses")


def stored_array(features: dict[str, Any], key: str) -> np.ndarray:
  """A precomputed feature as stored (bfloat16 is kept as its uint16 bits)."""
  arr = features[key]
  if features["meta"][key]["dtype"] == "bfloat16":
    arr = arr.view(ml_dtypes.bfloat16)
  return arr


def padded_text_states(features: dict[str, Any], mask: np.ndarray, *, where: str) -> np.ndarray:
  """A record's stored caption states (its real tokens) padded with zeros to the mask's length;
  the padded positions are masked out of every attention, so zeros change nothing."""
  states = stored_array(features, TEXT_STATES_KEY)
  if len(states) != int(np.sum(mask)):
    raise ValueError(f"record {where!r}: {len(states)} stored caption states but the caption "
                     f"has {int(np.sum(mask))} tokens; precompute with the config's tokenizer")
  out = np.zeros((len(mask), states.shape[1]), states.dtype)
  out[:len(states)] = states
  return out


def read_null_text(config) -> tuple[np.ndarray, np.ndarray]:
  """The empty caption's states ``[L, D]`` (float32) and mask ``[L]`` that the precompute pass
  wrote beside the shards (condition dropout gives them to a dropped caption)."""
  path = os.path.join(_shard_folder(config.data.path), NULL_TEXT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: config.text.states_from='shards' needs the "
                            "folder written by python -m mmsr_jax.precompute")
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(z["meta"].tobytes().decode("utf-8"))
    states, mask = z["states"], z["mask"]
  _check_text_meta(meta, config, where=path)
  if meta["dtype"] == "bfloat16":
    states = states.view(ml_dtypes.bfloat16)
  return np.asarray(states, np.float32), np.asarray(mask, np.int32)


def _shard_folder(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(list_shards(path, "config.data.path")[0])


def _check_text_meta(meta: dict, config, *, where: str) -> None:
  want = {"fingerprint": encoder_fingerprint(config, "text"), "tokenizer": config.text.tokenizer,
          "max_length": int(config.text.max_length),
          "d_model": int(config.text.encoder.d_model)}
  for key, value in want.items():
    if meta.get(key) != value:
      raise ValueError(f"{where}: caption states written with text {key} {meta.get(key)!r} but "
                       f"the config's is {value!r}; run python -m mmsr_jax.precompute with this "
                       "config, or set config.text.states_from='encoder'")


def _check_latent_meta(meta: dict, config, *, where: str) -> None:
  lat = int(config.data.hr_size) // int(config.autoencoder.factor)
  want = {"fingerprint": encoder_fingerprint(config, "ae"),
          "crop_size": int(config.data.hr_size),
          "scaling_factor": float(config.autoencoder.scaling_factor),
          "shift_factor": float(config.autoencoder.get("shift_factor", 0.0) or 0.0)}
  for key, value in want.items():
    if meta.get(key) != value:
      raise ValueError(f"{where}: HR latents written with autoencoder {key} {meta.get(key)!r} "
                       f"but the config's is {value!r}; run python -m mmsr_jax.precompute with "
                       "this config, or set config.autoencoder.hr_latents_from='encoder'")
  if tuple(meta["shape"][-3:-1]) != (lat, lat):
    raise ValueError(f"{where}: HR latents of {meta['shape'][-3:-1]} != the config's {lat}x{lat}")


def check_precomputed(config: ml_collections.ConfigDict, source) -> int | None:
  """Checks, before training starts, that the first record of ``source`` (an 'arrayrecord'
  source of precompute shards) holds what the config reads from shards, written by the encoders
  the config names (their fingerprints) at its sizes. Returns the token grid (ids from shards)."""
  inner = source.inner if isinstance(source, sources.CheckedSource) else source
  first = f"{inner.files[0]} record 0"
  data = inner.raw(0)
  grid = bank = None
  if config.vq.ids_from == "shards" or config.autoencoder.hr_latents_from == "shards":
    bank = read_crop_bank(data)
    if bank is None:
      raise ValueError(f"{first} has no crop bank: {IDS_FROM_SHARDS_NEEDS}")
    meta = bank["meta"]
    grid = int(config.data.map_size) // 2 ** (len(config.vq.arch.block_out_channels) - 1)
    check_bank_meta(meta, int(config.data.hr_size), int(config.data.map_size), grid, where=first)
  if config.vq.ids_from == "shards":
    if bool(meta.get("per_modality", False)) != bool(config.vq.per_modality):
      raise ValueError(f"{first}: tokenized with per_modality={meta.get('per_modality')} but "
                       f"config.vq.per_modality={config.vq.per_modality}")
    have = encoder_fingerprint(config, "vq")
    if have != meta["tokenizer_sha256"]:
      raise ValueError(f"config.vq.params={config.vq.params!r} (fingerprint {have[:16]}...) is "
                       f"not the tokenizer {first} was tokenized with "
                       f"({meta['tokenizer_sha256'][:16]}...); the edge ids are encoded every "
                       "step, so it must be that tokenizer")
  else:
    grid = None
  crops = read_crops(data)
  if crops is not None and bank is not None:
    check_crops_meta(crops["meta"], int(config.data.hr_size), len(bank["boxes"]), where=first)
  features, fmeta = read_features(data)
  for field, key, check in (("text.states_from", TEXT_STATES_KEY, _check_text_meta),
                            ("autoencoder.hr_latents_from", HR_LATENTS_KEY, _check_latent_meta)):
    node = config
    for part in field.split("."):
      node = node[part]
    if node != "shards":
      continue
    if key not in features:
      raise ValueError(f"{first} has no {key!r}: config.{field}='shards' needs shards written "
                       "by python -m mmsr_jax.precompute with that feature")
    check(fmeta[key], config, where=first)
  return grid
