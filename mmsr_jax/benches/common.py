"""Shared by every benchmark: common flags, device description, timing and memory helpers.

Lives here (not in ``mmsr_jax/bench.py``) so that benchmark modules can import it while
``mmsr_jax.bench`` runs as ``__main__``.
"""

from __future__ import annotations

import platform
import time
from typing import Callable

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file for benchmarks that build a model from one (e.g. "
    "configs/dit_l.py); --config.field=value overrides apply.", lock_config=False)
JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of key: value lines.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (after warm-up).")
WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed repetitions first (compilation).")


def device_description() -> str:
  """E.g. 'gpu: 1 x NVIDIA H100 80GB HBM3' or 'cpu: 8 x cpu (x86_64, 2 cores)'."""
  import os

  import jax
  devs = jax.devices()
  kind = devs[0].device_kind
  desc = f"{devs[0].platform}: {len(devs)} x {kind}"
  if devs[0].platform == "cpu":
    desc += f" ({platform.machine()}, {os.cpu_count()} cores)"
  return desc


def time_call(fn: Callable[[], object], repeats: int | None = None,
              warmup: int | None = None) -> float:
  """Median wall time of ``fn()`` in seconds; ``fn`` must block until its result is ready."""
  repeats = REPEATS.value if repeats is None else repeats
  warmup = WARMUP.value if warmup is None else warmup
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def peak_device_memory() -> int | None:
  """Peak bytes in use on device 0 since start, where the backend reports it (GPU/TPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def host_peak_rss() -> int:
  """Peak resident memory of this process in bytes (Linux ru_maxrss is in KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


