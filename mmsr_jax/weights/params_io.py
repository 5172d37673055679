"""Parameter files: Flax parameter trees stored as safetensors with ``/``-joined keys.

Only safetensors is read (never a pickle). Loading checks the file against the tree the model
expects and names the first offending key with both shapes, so a wrong file fails at start-up.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from mmsr_jax.formats import param_layout as layout
from mmsr_jax.formats.param_layout import PARAMS_FILE, params_file  # noqa: F401 (this module's API)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def flatten(tree) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  # Contiguous copies: safetensors.numpy writes a strided view's raw buffer (wrong values).
  return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def save_params(path: str, params) -> None:
  """Writes a parameter tree to ``path`` (safetensors); refuses to overwrite silently."""
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; remove it first or choose another --dst")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(flatten(params), path)


# safetensors dtype names -> numpy dtypes (bfloat16 and float8 through ml_dtypes, which numpy
# itself lacks; safetensors' own numpy reader refuses bfloat16 files).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str, *, as_float32: bool = True) -> dict[str, np.ndarray]:
  """Reads a safetensors file (memory-mapped) into numpy arrays, bfloat16 included.

  Floating tensors are returned as float32 when ``as_float32`` (the converters work in fp32).
  """
  check_safetensors_path(path, "safetensors file")
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    arr = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    if as_float32 and info["dtype"].startswith(("F", "BF")):
      arr = arr.astype(np.float32, copy=False)  # fp32 stays memory-mapped
    out[name] = arr
  return out


def check_safetensors_path(path: str, field: str) -> None:
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(
        f"{field}={path!r}: pickle files are never loaded. Convert it to safetensors first "
        "(e.g. load it yourself with torch.load(..., weights_only=True) and save with "
        "safetensors.torch.save_file), then run python -m mmsr_jax.convert on the result.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{field}={path!r}: no such file")


def load_params(path: str, abstract_tree, *, field: str = "params"):
  """Loads ``path`` (a safetensors file or a converted folder) into a tree shaped like
  ``abstract_tree`` (arrays or ShapeDtypeStructs)."""
  path = params_file(path)
  check_safetensors_path(path, field)
  data = read_safetensors(path, as_float32=False)
  expected = traverse_util.flatten_dict(abstract_tree, sep="/")
  if layout.is_per_layer(data) and not layout.is_per_layer(expected):
    data = layout.stack_layers(data)  # written before the layers were scanned
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
