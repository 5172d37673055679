"""Shared plumbing for importing PyTorch state dicts (as numpy arrays) into Flax trees."""

from __future__ import annotations

from typing import Callable

import flax
import numpy as np


def convert_state_dict(sd: dict[str, np.ndarray], abstract_params, *,
                       torch_key: Callable[[tuple[str, ...]], str],
                       to_flax: Callable[[tuple[str, ...], np.ndarray, tuple], np.ndarray],
                       model_name: str) -> dict:
  """Fills every leaf of ``abstract_params`` from ``sd``.

  ``torch_key(path)`` names the state-dict key of a Flax path; ``to_flax(path, array, shape)``
  converts its layout. A shape mismatch names the key and both shapes; missing and unexpected
  keys are listed. Returns ``{"params": tree}``.
  """
  expected = flax.traverse_util.flatten_dict(abstract_params)
  out, missing, used = {}, [], set()
  for path, spec in expected.items():
    key = torch_key(path)
    if key not in sd:
      missing.append(key)
      continue
    used.add(key)
    src = np.asarray(sd[key], dtype=np.float32)
    arr = to_flax(path, src, spec.shape)
    if arr.shape != spec.shape:
      raise ValueError(
          f"Shape mismatch for '{key}': checkpoint has {src.shape} "
          f"(-> {arr.shape} in Flax layout), model expects {spec.shape} "
          f"(Flax path {'/'.join(path)}).")
    out[path] = np.ascontiguousarray(arr)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected:
    raise ValueError(
        f"State dict does not match {model_name} config: missing keys {missing}, "
        f"unexpected keys {unexpected}.")
  return {"params": flax.traverse_util.unflatten_dict(out)}
