r"""``bench suite``: the accelerator check of the research path, one run, one JSON file.

  python -m mmsr_jax.bench suite --suite_output=device_check.json   # configs/dit_l.py

Random weights, nothing downloaded: (1) the train step at the largest batch XLA's memory
analysis says fits (step time, images/s, MFU); (2) cuDNN fused attention against XLA's at the
DiT's shapes (largest difference, time of each); (3) sampling images/s at 512 px, 50 DDIM steps,
m-CFG, VAE decode included, and the peak memory of a tiled 2048 px output. Each part's result is
written as soon as it exists, so a part that fails or runs out of time loses only itself.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np
from absl import flags

from mmsr_jax.benches import common


def define_flags() -> None:
  flags.DEFINE_string("suite_output", "device_check.json", "Where the JSON goes.")
  flags.DEFINE_list("suite_parts", ["train", "attention", "sample"],
                    "Parts to run, in order.")
  flags.DEFINE_integer("suite_probe_batch", 8, "Per-device batch of the train step "
                       "compiled for the memory analysis that sizes the timed batch.")
  flags.DEFINE_integer("suite_sample_size", 512, "Output side for images/s.")
  flags.DEFINE_integer("suite_sample_steps", 50, "DDIM steps.")
  flags.DEFINE_integer("suite_large", 2048, "Output side of the memory figure.")
  flags.DEFINE_integer("suite_train_repeats", 3, "Timed train steps.")


def _largest_batch(config, devices: int, probe: int) -> tuple[int, dict]:
  """The largest per-device batch (a multiple of 8, or of 1 below 8) whose train step XLA's
  memory analysis says fits in 90% of device memory, from one compile at ``probe``."""
  import jax

  from mmsr_jax.benches import train_speed as bench_train
  c = config.copy_and_resolve_references()
  c.batch_size = probe * devices
  probe_result = bench_train.analyze_memory(c)
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  if not limit:
    return probe, probe_result
  fixed = probe_result["argument_bytes_per_device"]
  per_example = probe_result["temp_bytes_per_device"] / probe
  fit = int((0.9 * limit - fixed) // max(per_example, 1))
  batch = fit // 8 * 8 if fit >= 8 else max(1, fit)
  return batch, dict(probe_result, bytes_limit=limit, predicted_per_device_batch=fit)


def _train(config) -> dict:
  import jax

  from mmsr_jax.benches import train_speed as bench_train
  F = flags.FLAGS
  n = len(jax.devices())
  per_device, probe = _largest_batch(config, n, F.suite_probe_batch)
  c = config.copy_and_resolve_references()
  c.batch_size = per_device * n
  out = bench_train.measure(c, repeats=F.suite_train_repeats, warmup=1)
  out["probe"] = probe
  return out


def _attention(config) -> dict:
  """cuDNN's fused attention against XLA's on the DiT's self-attention shapes."""
  import jax
  import jax.numpy as jnp

  from mmsr_jax.models import layers
  if jax.default_backend() != "gpu":
    return {"skipped": f"cuDNN attention needs a GPU (backend {jax.default_backend()})"}
  tokens = (config.data.hr_size // config.autoencoder.factor // config.model.patch_size) ** 2
  heads = config.model.num_heads
  shape = (8, tokens, heads, config.model.width // heads)
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
  out = {}
  results = {}
  for impl in ("xla", "cudnn"):
    fn = jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, implementation=impl))
    results[impl] = np.asarray(fn(q, k, v), np.float32)
    out[f"{impl}_seconds"] = common.time_call(lambda fn=fn: fn(q, k, v).block_until_ready(),
                                              repeats=10, warmup=2)
  out["max_abs_diff"] = float(np.abs(results["cudnn"] - results["xla"]).max())
  out["max_abs_value"] = float(np.abs(results["xla"]).max())
  out["shape"] = list(shape)
  out["speedup"] = out["xla_seconds"] / out["cudnn_seconds"]
  return out


def _sample(config) -> dict:
  from mmsr_jax.benches import sampling_speed as bench_sample
  F = flags.FLAGS
  return bench_sample.measure(config.copy_and_resolve_references(), size=F.suite_sample_size,
                              steps=F.suite_sample_steps, guidance="mcfg", batch=0,
                              large=F.suite_large, large_execute=True, repeats=2)


PARTS = {"train": _train, "attention": _attention, "sample": _sample}


def run() -> dict:
  F = flags.FLAGS
  config = common.CONFIG.value
  if config is None:
    from configs import dit_l
    config = dit_l.get_config()
  result = {"device": common.device_description(), "started": time.strftime("%Y-%m-%d %H:%M"),
            "config": f"DiT {config.model.width} x {config.model.depth}, "
                      f"{config.compute_dtype}, remat {config.model.remat}"}
  t_start = time.perf_counter()
  for name in F.suite_parts:
    if name not in PARTS:
      raise ValueError(f"--suite_parts: unknown part {name!r}; expected {sorted(PARTS)}")
    t0 = time.perf_counter()
    try:
      result[name] = PARTS[name](config)
    except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
      result[name] = {"error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5)}
    result[name + "_wall_s"] = time.perf_counter() - t0
    result["wall_s"] = time.perf_counter() - t_start
    tmp = F.suite_output + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1, default=str)
    os.replace(tmp, F.suite_output)
  return {"output": F.suite_output, "wall_s": result["wall_s"],
          **{k: v for k, v in result.items() if k in PARTS and "error" in v}}
