r"""``bench train``: step time, images/s and MFU of the real SR update step on a synthetic batch of
the config's shapes, with XLA's own FLOP count of the compiled step.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from mmsr_jax.benches import common

_PEAK = None


def define_flags() -> None:
  global _PEAK
  _PEAK = flags.DEFINE_float(
      "peak_flops", 0.0, "Peak FLOP/s per device for MFU when the device is not in "
      "mmsr_jax.training.flops.PEAK_FLOPS (e.g. CPU); 0 = the table (MFU null when unknown).")


def synthetic_batch(config, seed: int = 0) -> dict:
  """A global batch of the shapes the training pipeline produces, random values."""
  rng = np.random.default_rng(seed)
  b, s, m, n = (config.batch_size, config.data.hr_size, config.data.map_size,
                config.text.max_length)
  lr = s // config.data.scale
  img = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)  # noqa: E731
  mask = np.zeros((b, n), np.int32)
  mask[:, : max(1, n // 2)] = 1
  return {"hr": img(b, s, s, 3), "lr": img(b, lr, lr, 3), "depth": img(b, m, m, 3),
          "seg": img(b, m, m, 3), "edge": img(b, m, m, 3), "present": np.ones((b, 3), bool),
          "text_ids": rng.integers(0, 259, (b, n)).astype(np.int32) * mask,
          "text_mask": mask}


def measure(config, *, peak_flops: float = 0.0, repeats: int | None = None,
            warmup: int | None = None, devices=None) -> dict:
  """Builds the trainer for ``config`` (on ``devices``, default all) and times its update step."""
  import jax

  from mmsr_jax.training import flops as flops_lib
  from mmsr_jax.training.sr_task import SRTask
  from mmsr_jax.runtime import sharding
  config = config.copy_and_resolve_references()
  config.text.params = config.vq.params = config.autoencoder.params = ""
  config.text.tokenizer = "byte"
  config.model.init_from = ""
  trainer = SRTask(config, "/unused", devices=devices)
  state = trainer.init_state()
  batch = sharding.global_batch(synthetic_batch(config), trainer.mesh)

  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, trainer.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The compiled SPMD program is one device's share: XLA's count times the number of devices.
  xla_flops = float((cost or {}).get("flops", float("nan"))) * trainer.mesh.devices.size

  def one_step():
    nonlocal state
    state, metrics = compiled(state, trainer.frozen, batch)
    jax.block_until_ready(metrics["loss"])

  step_time = common.time_call(one_step, repeats, warmup)
  n = trainer.mesh.devices.size
  peak = peak_flops or flops_lib.peak_flops_per_device(trainer.mesh.devices.flat[0])
  model_flops = trainer.flops_per_step()
  return {
      "step_time_s": step_time,
      "images_per_s": config.batch_size / step_time,
      "mfu": model_flops / step_time / (peak * n) if peak else None,
      "hfu_xla": xla_flops / step_time / (peak * n) if peak else None,
      "model_tflops_per_step": model_flops / 1e12,
      "xla_tflops_per_step": xla_flops / 1e12,
      "peak_tflops_per_device": peak / 1e12 if peak else None,
      "batch_size": config.batch_size,
      "resolution": config.data.hr_size,
      "compute_dtype": config.compute_dtype,
      "remat": bool(config.model.remat),
      "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
      "mesh": dict(trainer.mesh.shape),
      "compile_s": compile_s,
      "peak_device_memory": common.peak_device_memory(),
      "host_peak_rss": common.host_peak_rss(),
  }


def run() -> dict:
  if common.CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config=configs/dit_l.py")
  return measure(common.CONFIG.value, peak_flops=_PEAK.value if _PEAK is not None else 0.0)
