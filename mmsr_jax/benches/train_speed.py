r"""``bench train``: step time, images/s and MFU of the real SR update step on a synthetic batch of
the config's shapes; ``--analyze`` compiles the step without running it (any machine, no weights)
and reports XLA's FLOP count, the trainable model's share of it, the frozen encoders' share, the
program size and the compile time.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from mmsr_jax import programs
from mmsr_jax.benches import common


def define_flags() -> None:
  flags.DEFINE_float(
      "peak_flops", 0.0, "Peak FLOP/s per device for MFU when the device is not in "
      "mmsr_jax.training.flops.PEAK_FLOPS (e.g. CPU); 0 = the table (MFU null when unknown).")
  flags.DEFINE_bool(
      "analyze", False, "Compile the step for abstract inputs (nothing allocated, no weights) "
      "and report XLA's FLOP and instruction counts instead of timing it.")


def synthetic_batch(config, seed: int = 0) -> dict:
  """A global batch of the shapes the training pipeline produces
  (``mmsr_jax.training.sr_task.batch_spec``), random values."""
  import ml_dtypes

  from mmsr_jax.training import sr_task
  rng = np.random.default_rng(seed)
  out = {}
  for name, (shape, dtype) in sr_task.batch_spec(config).items():
    if dtype == "bool":
      out[name] = np.ones(shape, bool)
    elif name == "text_mask":
      out[name] = np.zeros(shape, np.int32)
      out[name][:, : max(1, shape[1] // 2)] = 1
    elif name == "text_ids":
      out[name] = rng.integers(0, 259, shape).astype(np.int32)
    elif name == "vq_ids":
      out[name] = rng.integers(0, config.vq.arch.num_vq_embeddings, shape).astype(np.int32)
    elif dtype == "bfloat16":
      out[name] = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    else:
      out[name] = rng.uniform(-1, 1, shape).astype(np.float32)
  if "text_mask" in out:
    out["text_ids"] = out["text_ids"] * out["text_mask"]
  return out


def _flops(compiled, devices: int) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The compiled SPMD program is one device's share: XLA's count times the number of devices.
  return float((cost or {}).get("flops", float("nan"))) * devices


def _abstract_step(config, devices=None) -> dict:
  """The jitted update step of ``config`` and abstract arguments carrying their shardings."""
  import jax
  step, args, config, system = programs.train_program(
      config, jax.devices() if devices is None else list(devices))
  return {"config": config, "system": system, "step": step, "args": args}


def analyze_memory(config, *, devices=None) -> dict:
  """One compile of the update step for abstract inputs: XLA's memory analysis and the time."""
  a = _abstract_step(config, devices)
  t0 = time.perf_counter()
  compiled = a["step"].lower(*a["args"]).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  return {"compile_s": compile_s, "compiled": compiled, "abstract": a,
          "temp_bytes_per_device": int(memory.temp_size_in_bytes),
          "argument_bytes_per_device": int(memory.argument_size_in_bytes)}


def analyze(config, *, devices=None) -> dict:
  """Compiles the update step for abstract state, frozen weights and batch (nothing is
  allocated) and reads XLA's counts of the compiled program."""
  import jax

  from mmsr_jax.models import layers
  from mmsr_jax.training import flops as flops_lib
  from mmsr_jax.training import sr_task
  mem = analyze_memory(config, devices=devices)
  a = mem.pop("abstract")
  compiled = mem.pop("compiled")
  config, system = a["config"], a["system"]
  n = system.mesh.devices.size
  cond = system.conditioner

  def frozen_work(frozen, batch):  # what the step runs of the frozen encoders
    c = cond(frozen, batch)
    return c, cond.batch_target(frozen, batch, c["lr_latent"])
  # FLOPs are counted on copies traced with the layer stacks unrolled: XLA's cost analysis
  # counts a loop body once, whatever its trip count (a new jit: the scanned trace is cached).
  with layers.unrolled_scans():
    unrolled = sr_task.jitted_step(system, jax.tree.map(lambda x: x.sharding, a["args"][1]))
    step_flops = _flops(unrolled.lower(*a["args"]).compile(), n)
    frozen_flops = _flops(jax.jit(frozen_work).lower(*a["args"][1:]).compile(), n)
  b = config.batch_size
  model = flops_lib.mmsr_train_flops_per_step(config)
  return {
      "config": f"DiT {config.model.width} x {config.model.depth}, {config.compute_dtype}, "
                f"remat {config.model.remat}, attention {system.model.attention}",
      "batch_size": b, "resolution": config.data.hr_size,
      "features_from_shards": [f for f, v in (("vq_ids", config.vq.ids_from),
                                              ("text_states", config.text.states_from),
                                              ("hr_latents",
                                               config.autoencoder.hr_latents_from))
                               if v == "shards"],
      "xla_flops_per_image": step_flops / b,
      "model_flops_per_image": model / b,
      "model_flops_share": model / step_flops,
      "frozen_flops_share": frozen_flops / step_flops,
      "hlo_instructions": sum(1 for line in compiled.as_text().splitlines() if " = " in line),
      **mem,
      "attention": system.model.attention,
      "mesh": dict(system.mesh.shape),
  }


def measure(config, *, peak_flops: float = 0.0, repeats: int | None = None,
            warmup: int | None = None, devices=None) -> dict:
  """Builds the task for ``config`` (on ``devices``, default all) and times its update step
  (XLA's FLOP count of the step: ``analyze``)."""
  import jax

  from mmsr_jax.runtime import sharding
  from mmsr_jax.training import flops as flops_lib
  from mmsr_jax.training.sr_task import SRTask
  config = programs.no_weight_files(config)
  null = (np.zeros((config.text.max_length, config.text.encoder.d_model), np.float32),
          np.zeros((config.text.max_length,), np.int32))
  trainer = SRTask(config, "/unused", devices=devices, null_text=null)
  state = trainer.init_state()
  batch = sharding.global_batch(synthetic_batch(config), trainer.mesh)

  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(state, trainer.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  n = trainer.mesh.devices.size

  def one_step():
    nonlocal state
    state, metrics = compiled(state, trainer.frozen, batch)
    jax.block_until_ready(metrics["loss"])

  step_time = common.time_call(one_step, repeats, warmup)
  peak = peak_flops or flops_lib.peak_flops_per_device(trainer.mesh.devices.flat[0])
  model_flops = trainer.flops_per_step()
  return {
      "step_time_s": step_time,
      "images_per_s": config.batch_size / step_time,
      "mfu": model_flops / step_time / (peak * n) if peak else None,
      "model_tflops_per_step": model_flops / 1e12,
      "peak_tflops_per_device": peak / 1e12 if peak else None,
      "batch_size": config.batch_size,
      "resolution": config.data.hr_size,
      "compute_dtype": config.compute_dtype,
      "remat": config.model.remat,
      "attention": trainer.system.model.attention,
      "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
      "mesh": dict(trainer.mesh.shape),
      "compile_s": compile_s,
      "peak_device_memory": common.peak_device_memory(),
      "host_peak_rss": common.host_peak_rss(),
  }


def run() -> dict:
  if common.CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config=configs/dit_l.py")
  if flags.FLAGS.analyze:
    return analyze(common.CONFIG.value)
  return measure(common.CONFIG.value, peak_flops=flags.FLAGS.peak_flops)
