"""Shared plumbing for importing PyTorch state dicts (as numpy arrays) into Flax trees."""

from __future__ import annotations

from typing import Callable

import flax
import numpy as np

# Names of the scanned layer stacks in our trees (``nn.scan``: a leading layer axis). A PyTorch
# model lists those layers one by one; the key functions see them as ``<name>_<i>``.
STACKED = ("blocks", "block")


def _layers(path: tuple[str, ...]) -> int | None:
  """Position of the stacked collection in ``path`` (None when the leaf is not stacked)."""
  for i, part in enumerate(path[:-1]):
    if part in STACKED:
      return i
  return None


def convert_state_dict(sd: dict[str, np.ndarray], abstract_params, *,
                       torch_key: Callable[[tuple[str, ...]], str],
                       to_flax: Callable[[tuple[str, ...], np.ndarray, tuple], np.ndarray],
                       model_name: str) -> dict:
  """Fills every leaf of ``abstract_params`` from ``sd``.

  ``torch_key(path)`` names the state-dict key of a Flax path, where a layer ``i`` of a scanned
  stack appears as ``blocks_<i>``; ``to_flax(path, array, shape)`` converts its layout. The
  layers of a stack are stacked on a leading axis. A shape mismatch names the key and both
  shapes; missing and unexpected keys are listed. Returns ``{"params": tree}``.
  """
  expected = flax.traverse_util.flatten_dict(abstract_params)
  out, missing, used = {}, [], set()

  def one(path, shape):
    key = torch_key(path)
    if key not in sd:
      missing.append(key)
      return None
    used.add(key)
    src = np.asarray(sd[key], dtype=np.float32)
    arr = to_flax(path, src, shape)
    if arr.shape != tuple(shape):
      raise ValueError(
          f"Shape mismatch for '{key}': checkpoint has {src.shape} "
          f"(-> {arr.shape} in Flax layout), model expects {tuple(shape)} "
          f"(Flax path {'/'.join(path)}).")
    return arr

  for path, spec in expected.items():
    j = _layers(path)
    if j is None:
      arr = one(path, spec.shape)
    else:
      per_layer = [one(path[:j] + (f"{path[j]}_{i}",) + path[j + 1:], spec.shape[1:])
                   for i in range(spec.shape[0])]
      arr = None if any(a is None for a in per_layer) else np.stack(per_layer)
    if arr is not None:
      out[path] = np.ascontiguousarray(arr)
  unexpected = sorted(set(sd) - used)
  if missing or unexpected:
    raise ValueError(
        f"State dict does not match {model_name} config: missing keys {missing}, "
        f"unexpected keys {unexpected}.")
  return {"params": flax.traverse_util.unflatten_dict(out)}
