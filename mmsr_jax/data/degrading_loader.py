"""Batch-wise Real-ESRGAN degradation of a Grain loader's batches, prepared ahead on a thread, with
checkpointable iterator state.
"""

from __future__ import annotations

import queue
import threading

import grain.python as pygrain
import numpy as np

from mmsr_jax.data import realesrgan
from mmsr_jax.data.modalities import canny_edges, render_map


class DegradingIterator:
  """Wraps a Grain loader iterator: applies the Real-ESRGAN degradation (jitted blur / resize /
  noise on the default device, JPEG on the host) to each batch and adds 'lr' and 'edge'.

  With ``prefetch > 0`` a background thread prepares that many batches ahead, so the host JPEG
  and the device degradation overlap the train step. ``get_state`` returns the Grain state just
  after the last batch *returned* (not the prefetched ones), so a checkpoint resumes on the next
  unseen example; ``set_state`` restarts the prefetching from there.
  """

  def __init__(self, it, degrader: realesrgan.RealESRGANDegrader, map_size: int,
               prefetch: int = 2):
    self._it = it
    self._degrader = degrader
    self._map_size = int(map_size)
    self._prefetch = int(prefetch)
    self._state = it.get_state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = dict(batch)
    params = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("deg_")}
    hr = (batch["hr"] + np.float32(1.0)) * np.float32(0.5)
    lr = self._degrader(hr, params)
    batch["lr"] = lr * np.float32(2.0) - np.float32(1.0)
    batch["edge"] = np.stack([render_map("edge", canny_edges(x, self._map_size),
                                         self._map_size) for x in lr])
    return batch

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        item = (self.process(batch), self._it.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch <= 0:
      out = self.process(next(self._it))
      self._state = self._it.get_state()
      return out
    if self._thread is None:
      self._stop.clear()
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._thread = threading.Thread(target=self._produce, daemon=True,
                                      name="degrade-prefetch")
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._halt()
      raise item
    out, self._state = item
    return out

  def close(self) -> None:
    """Stops the prefetch thread (the wrapped iterator's workers stop when it is dropped)."""
    self._halt()

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass
      self._thread = None

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._halt()
    self._it.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    """Called by Grain's checkpoint handler after a restore; prefetching starts on demand."""


class DegradedLoader:
  """An iterable over degraded batches (see ``DegradingIterator``)."""

  def __init__(self, loader: pygrain.DataLoader, degrader: realesrgan.RealESRGANDegrader,
               map_size: int, prefetch: int):
    self.loader = loader
    self.degrader = degrader
    self.map_size = map_size
    self.prefetch = prefetch

  def __iter__(self) -> DegradingIterator:
    return DegradingIterator(iter(self.loader), self.degrader, self.map_size, self.prefetch)
