"""Parameter files: Flax parameter trees stored as safetensors with ``/``-joined keys.

Only safetensors is read (never a pickle). Loading checks the file against the tree the model
expects and names the first offending key with both shapes, so a wrong file fails at start-up.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def flatten(tree) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def save_params(path: str, params) -> None:
  """Writes a parameter tree to ``path`` (safetensors); refuses to overwrite silently."""
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; remove it first or choose another --dst")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(flatten(params), path)


def check_safetensors_path(path: str, field: str) -> None:
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(
        f"{field}={path!r}: pickle files are never loaded. Convert it to safetensors first "
        "(e.g. load it yourself with torch.load(..., weights_only=True) and save with "
        "safetensors.torch.save_file), then run python -m mmsr_jax.convert on the result.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{field}={path!r}: no such file")


def load_params(path: str, abstract_tree, *, field: str = "params"):
  """Loads ``path`` into a tree shaped like ``abstract_tree`` (arrays or ShapeDtypeStructs)."""
  check_safetensors_path(path, field)
  data = load_file(path)
  expected = traverse_util.flatten_dict(abstract_tree, sep="/")
  missing = sorted(set(expected) - set(data))
  unexpected = sorted(set(data) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{field}={path!r}: keys do not match the model. missing: {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''}")
  out = {}
  for key, spec in expected.items():
    value = data[key]
    if tuple(value.shape) != tuple(spec.shape):
      raise ValueError(f"{field}={path!r}: key {key!r} has shape {tuple(value.shape)} in the file "
                       f"but the model expects {tuple(spec.shape)}")
    out[key] = value.astype(spec.dtype)
  return traverse_util.unflatten_dict(out, sep="/")
