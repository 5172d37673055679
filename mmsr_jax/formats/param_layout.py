"""How parameter files sit on disk: the file inside a converted folder, and weights saved before
the layers were scanned: per-layer keys (``blocks_<i>/...``, T5's ``block_<i>/...``) in the
stacked layout of ``nn.scan`` (``blocks/...`` with a leading layer axis), so older converted
folders and runs still load."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

PARAMS_FILE = "params.safetensors"  # inside a folder written by ``python -m mmsr_jax.convert``


def params_file(path: str) -> str:
  """A config's weights path: a converted folder (-> its params.safetensors) or the file."""
  return os.path.join(path, PARAMS_FILE) if os.path.isdir(path) else path

_PER_LAYER = re.compile(r"(^|/)(blocks|block)_(\d+)(?=/)")
# transformers (and our earlier T5) keep the shared position-bias table in the first layer.
_T5_BIAS = re.compile(r"(^|/)block_0/layer_0/SelfAttention/(relative_attention_bias/)")


def is_per_layer(keys) -> bool:
  return any(_PER_LAYER.search(k) for k in keys)


def stack_layers(flat: dict[str, Any]) -> dict[str, np.ndarray]:
  """``/``-keyed arrays in the per-layer layout -> the stacked layout (other keys unchanged).

  Raises:
    ValueError: a stack whose layers are not numbered 0..n-1 or differ in shape.
  """
  out: dict[str, Any] = {}
  stacks: dict[str, dict[int, Any]] = {}
  for key, value in flat.items():
    key = _T5_BIAS.sub(r"\1\2", key)
    m = _PER_LAYER.search(key)
    if m is None:
      out[key] = value
      continue
    stacked = key[:m.start()] + m.group(1) + m.group(2) + key[m.end():]
    stacks.setdefault(stacked, {})[int(m.group(3))] = value
  for key, layers in stacks.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"per-layer weights of {key!r} are numbered {sorted(layers)}, not 0..n-1")
    arrays = [np.asarray(layers[i]) for i in range(len(layers))]
    if len({a.shape for a in arrays}) != 1:
      raise ValueError(f"per-layer weights of {key!r} differ in shape")
    out[key] = np.stack(arrays)
  return out
