"""Where the frozen text encoder runs at sampling time (``config.sampling.text_device``): inside the
jitted sampler on the accelerator, or on the host CPU so that a large encoder (T5-XXL) takes no
accelerator memory.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from mmsr_jax.diffusion import guidance as guidance_lib
from mmsr_jax.schema.sr import TEXT_DEVICES

AUTO_HOST_TEXT_BYTES = 2 ** 30  # "auto": T5 weights above this stay on the host (T5-XXL: 19 GB)
TEXT_CACHE_SIZE = 8  # host text states kept per distinct token row (caption, negative, empty)


def host_device():
  """The host CPU device the text encoder uses in ``text_device='cpu'`` mode."""
  return jax.devices("cpu")[0]


def check_text_device(value: str) -> str:
  if value not in TEXT_DEVICES:
    raise ValueError(f"config.sampling.text_device={value!r}: expected one of {TEXT_DEVICES}")
  return value


def text_param_bytes(conditioner) -> int:
  """Bytes of the frozen text encoder's weights (from shapes only; nothing is allocated)."""
  shapes = conditioner.abstract_params("text")
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def choose_text_device(value: str, text_bytes: int) -> str:
  """``"accelerator"`` or ``"cpu"`` for a setting; ``"auto"`` keeps a text encoder larger than
  :data:`AUTO_HOST_TEXT_BYTES` on the host when the default backend is an accelerator."""
  if check_text_device(value) != "auto":
    return value
  big = text_bytes > AUTO_HOST_TEXT_BYTES
  return "cpu" if big and jax.default_backend() != "cpu" else "accelerator"


class HostTextEncoder:
  """The frozen text encoder on the host CPU (:func:`host_device`): its weights never reach the
  accelerators; each distinct token row is encoded there once and kept in an LRU of
  :data:`TEXT_CACHE_SIZE` rows (the caption, negative prompt and empty caption repeat from image
  to image), and the sampler gets the states as inputs."""

  def __init__(self, conditioner, text_params):
    self.params = jax.device_put(text_params, host_device())
    self._fn = jax.jit(lambda p, ids, mask: conditioner.text_states({"text": p}, ids, mask))
    self._cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
    self.cache_hits = self.cache_misses = 0

  def rows(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Host text states ``[n, L, D]`` of token rows ``[n, L]``."""
    rows = []
    for i, m in zip(np.asarray(ids), np.asarray(mask)):
      key = (i.dtype.str, i.tobytes(), m.dtype.str, m.tobytes())
      states = self._cache.get(key)
      if states is None:
        self.cache_misses += 1
        args = jax.device_put((i[None], m[None]), host_device())
        states = np.asarray(jax.device_get(self._fn(self.params, *args)))[0]
        self._cache[key] = states
        while len(self._cache) > TEXT_CACHE_SIZE:
          self._cache.popitem(last=False)
      else:
        self.cache_hits += 1
        self._cache.move_to_end(key)
      rows.append(states)
    return np.stack(rows)

  def with_states(self, inputs: dict, guidance: str) -> dict:
    """Sampler inputs with host-computed ``states`` / ``states_mask`` (positive rows, then the
    negative branch's) in place of the token ids."""
    text = (inputs["text_ids"], inputs["text_mask"])
    if guidance != "none":
      (n_ids, n_mask), _ = guidance_lib.negative_branch(
          guidance, text, (inputs["neg_ids"], inputs["neg_mask"]),
          (inputs["null_ids"], inputs["null_mask"]), inputs["present"])
      text = (np.concatenate([text[0], n_ids]), np.concatenate([text[1], n_mask]))
    ids_keys = ("text_ids", "text_mask", "neg_ids", "neg_mask", "null_ids", "null_mask")
    out = {k: v for k, v in inputs.items() if k not in ids_keys}
    out["states"], out["states_mask"] = self.rows(*text), np.asarray(text[1])
    return out
