"""The project's two device programs, the SR train step and the sampler, compiled ahead of time
for any set of devices (a TPU slice described by libtpu on a CPU host included) from abstract
inputs: nothing is allocated and no weights are read. Each compile becomes a report: whether it
fits the chip, per-chip memory, collectives, FLOPs and a roofline projection; ``search_batch``
finds the largest per-chip batch that fits by compile bisection.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mmsr_jax.diffusion import sampler
from mmsr_jax.runtime import compiled as compiled_lib
from mmsr_jax.runtime import sharding, topology
from mmsr_jax.system import System
from mmsr_jax.training import flops as flops_lib
from mmsr_jax.training import sr_task

PROGRAMS = ("train", "sample")


def no_weight_files(config):
  """A copy of ``config`` that reads no weights and no hub: random frozen encoders, the byte
  caption tokenizer, no pretrained DiT (shapes, and so the program, are unchanged)."""
  config = config.copy_and_resolve_references()
  config.text.params = config.vq.params = config.autoencoder.params = ""
  config.text.tokenizer = "byte"
  config.model.init_from = ""
  return config


def train_program(config, devices, per_chip_batch: int | None = None) -> tuple:
  """(jitted step, abstract args, config) of the update step on ``devices``; the global batch is
  ``per_chip_batch`` x chips when given, else the config's."""
  config = no_weight_files(config)
  if per_chip_batch:
    config.batch_size = int(per_chip_batch) * len(devices)
  system = System.from_config(config, devices)
  step, args = sr_task.abstract_step(system)
  return step, args, config, system


def sample_program(config, devices, *, per_chip_batch: int = 1, size: int = 512,
                   steps: int = 50, guidance: str = "mcfg", tile_batch: int | None = None,
                   map_batch: int | None = None) -> tuple:
  """(jitted sampler, abstract args, config) of ``per_chip_batch`` x chips outputs of ``size``
  px on a data-parallel mesh of ``devices``: the DDIM loop with both guidance branches and the
  VAE decode in one program, the caption's text-encoder states an input (the text encoder runs
  on the host when sampling with T5-XXL). Outputs larger than the trained size are tiled."""
  config = no_weight_files(config)
  n = len(devices)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = n, 1, 1
  config.batch_size = n
  s = config.data.scale
  if size % (s * config.autoencoder.factor):
    raise ValueError(f"output size {size} is not a multiple of scale x autoencoder factor "
                     f"({s * config.autoencoder.factor})")
  system = System.from_config(config, devices)
  grid = sampler.make_grid(config, (size // s, size // s))
  fn = sampler.make_sample_fn(
      system.model, system.conditioner, system.schedule, grid, steps=steps, guidance=guidance,
      spacing=config.sampling.spacing, clip_x0=config.sampling.clip_x0, strength=1.0,
      mesh=system.mesh, tile_batch=tile_batch, map_batch=map_batch)
  repl = sharding.replicated(system.mesh)
  split = sharding.batch_sharding(system.mesh)
  spec = lambda shape, dtype, sh=repl: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa
  b = per_chip_batch * n
  rows = 2 * b if guidance != "none" else b
  m, l, d = config.data.map_size, config.text.max_length, config.text.encoder.d_model
  lr_side = size // s
  inputs = {"lr": spec((b, lr_side, lr_side, 3), jnp.float32, split),
            "maps": spec((b * grid.num_tiles, 3, m, m, 3), jnp.float32, split),
            "present": spec((b * grid.num_tiles, 3), jnp.bool_, split),
            "temperature": spec((b, 4), jnp.float32, split),
            "states": spec((rows, l, d), jnp.float32, split),
            "states_mask": spec((rows, l), jnp.int32, split)}
  params = jax.tree.map(lambda a: spec(a.shape, a.dtype), system.abstract_state.params)
  frozen = {p: jax.tree.map(lambda a: spec(a.shape, a.dtype),
                            system.conditioner.abstract_params(p)) for p in ("ae", "vq")}
  frozen["text"] = {}
  args = (params, frozen, inputs, jax.random.key(0), jnp.float32(2.0), jnp.float32(0.0))
  return fn, args, config, system, grid


def _advice(program: str, config) -> str:
  if program == "train":
    remat = config.model.remat
    tips = []
    if remat != "full":
      tips.append(f"--config.model.remat=full (now {remat!r}: recompute each block in the "
                  "backward pass)")
    tips.append("a smaller per-chip batch (--config.batch_size, or --search_batch for the "
                "largest that fits)")
    if config.mesh.fsdp != -1 and config.mesh.data != 1:
      tips.append("FSDP over every chip (--config.mesh.data=1 --config.mesh.fsdp=-1)")
    return "; or ".join(tips)
  return ("fewer images per chip, or cap the tiles per denoiser pass "
          "(--sample_tile_batch / --sample_map_batch) for tiled outputs")


def compile_report(program: str, build: Callable[[], tuple], devices, *,
                   flops_per_chip: Callable[[Any], dict] | None = None) -> tuple[dict, Any]:
  """Compiles what ``build()`` returns (``(fn, args, config, ...)``) and reports it per chip;
  a program that does not fit is a result (``fits: false``, the bytes it wanted, what to
  change), not an exception. Returns ``(report, compiled or None, lowered)``."""
  built = build()
  fn, args, config = built[0], built[1], built[2]
  chip = topology.chip_of(devices)
  n = len(devices)
  report: dict[str, Any] = {
      "program": program, "devices": n, "hosts": topology.num_hosts(devices),
      "device_kind": devices[0].device_kind,
      "hbm_bytes": chip.hbm_bytes if chip else None,
      "attention": built[3].model.attention, "remat": config.model.remat,
      "mesh": {k: int(v) for k, v in built[3].mesh.shape.items()}}
  whole = sharding.unsharded_params(built[3].boxed_params, built[3].mesh)
  if whole:  # the mesh splits these over an axis their width does not divide: whole on each chip
    report["unsharded_params"] = {
        "count": len(whole),
        "bytes": sum(math.prod(a.shape) * a.dtype.itemsize for a in whole.values()),
        "example": next(iter(whole))}
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile(topology.compiler_options(devices) or None)
  except Exception as e:  # XLA reports a program over the chip's memory as RESOURCE_EXHAUSTED
    oom = compiled_lib.out_of_memory(e)
    if oom is None:
      raise
    report.update(fits=False, xla_accepts=False, compile_s=time.perf_counter() - t0, **oom,
                  advice=_advice(program, config))
    return report, None, lowered
  report["compile_s"] = time.perf_counter() - t0
  mem = compiled_lib.memory(compiled)
  report.update(mem)
  limit = chip.usable_bytes() if chip else None
  if chip and limit != chip.hbm_bytes:
    report["limit_bytes"] = limit
  # XLA's own check is the compile itself; the sum of its sizes can exceed the chip where XLA
  # shares memory between them, so `fits` also asks the sum to be within the chip (conservative)
  report["xla_accepts"] = True
  report["fits"] = limit is None or mem["peak_bytes"] <= limit
  if not report["fits"]:
    report["advice"] = _advice(program, config)
  text = compiled.as_text()
  report["hlo_instructions"] = compiled_lib.hlo_instructions(text)
  report["collectives"] = compiled_lib.collectives(text)
  if flops_per_chip is not None:
    counted = flops_per_chip(config)
    report.update(counted)
    report.update(compiled_lib.roofline(
        flops_per_chip=counted["flops_per_chip"],
        model_flops_per_chip=counted["model_flops_per_chip"], mem=mem, chip=chip))
  return report, compiled, lowered


def xla_flops_per_example(config) -> float:
  """XLA's FLOP count of one example's update step: the step traced with its layer stacks
  unrolled (a loop body is otherwise counted once), at batch 1, compiled for one CPU device of
  this host; the same HLO whatever the target, so it stands for the TPU program's work (frozen
  encoders and any recompute XLA keeps included, attention counted as XLA's)."""
  from mmsr_jax.models import layers
  config = no_weight_files(config)
  config.batch_size = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.model.attention = "xla"
  system = System.from_config(config, jax.devices("cpu")[:1])
  with layers.unrolled_scans():
    step, args = sr_task.abstract_step(system)
    cost = step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def train_flops(devices, *, xla: bool = True) -> Callable[[Any], dict]:
  """The train step's FLOPs per chip: XLA's count (:func:`xla_flops_per_example` times the
  per-chip batch) or, with ``xla=False``, the project's count of the trainable model
  (``mmsr_jax.training.flops``, plus one forward where ``remat='full'`` recomputes it);
  ``model_flops_per_chip`` (for MFU) is always the project's count."""
  per_example: dict[str, float] = {}

  def count(config) -> dict:
    model = flops_lib.mmsr_train_flops_per_step(config) / len(devices)
    per_chip_batch = config.batch_size / len(devices)
    if xla:
      probe = config.copy_and_resolve_references()
      probe.batch_size = 1
      key = probe.to_json()  # one CPU compile per config, whatever the batch
      if key not in per_example:
        per_example[key] = xla_flops_per_example(probe)
      return {"flops_per_chip": per_example[key] * per_chip_batch,
              "model_flops_per_chip": model,
              "flops_counted_by": "XLA's cost analysis of the step with unrolled layer stacks, "
                                  "compiled for this host at batch 1, times the per-chip batch"}
    recompute = model / 3 if config.model.remat == "full" else 0.0
    return {"flops_per_chip": model + recompute, "model_flops_per_chip": model,
            "flops_counted_by": "mmsr_jax.training.flops (DiT + MMLC matmuls and attention, "
                                "3 x forward, + 1 x forward under remat 'full'); frozen "
                                "encoders not counted"}
  return count


def sample_flops(devices, per_chip_batch: int, steps: int, guided: bool) -> Callable:
  """The sampler's denoiser FLOPs per chip by the project's count (one tile per image; VAE / VQ
  encoders and the decode not counted), so its projected time is a lower bound."""
  def count(config) -> dict:
    f = flops_lib.mmsr_forward_flops(config)
    rows = 2 if guided else 1
    total = rows * (steps * f["dit"] + f["context"]) * per_chip_batch
    return {"flops_per_chip": total, "model_flops_per_chip": None,
            "flops_counted_by": "mmsr_jax.training.flops (DiT forward per step and branch, "
                                "MMLC once); VAE / VQ encoders and the decode not counted"}
  return count


def search_batch(try_batch: Callable[[int], dict], *, start: int = 1,
                 limit: int = 1024, step: int = 1) -> tuple[int, list[dict]]:
  """The largest per-chip batch in ``[1, limit]`` whose report fits, by compiles
  (``try_batch(b)`` compiles and reports), trying only multiples of ``step`` (a train step whose
  frozen encoders run in k interleaved passes wants a per-chip batch that k divides: otherwise
  XLA moves the whole batch between chips around the passes, and memory jumps). From ``start``
  it doubles (or halves) to a bracket, then narrows it, each next batch predicted from the bytes
  the bracket's two ends used or wanted (memory grows about linearly with the batch) and kept
  strictly inside the bracket, so the answer is exact whatever the prediction. 0 when even a
  batch of ``step`` does not fit."""
  tried: dict[int, dict] = {}
  step = max(1, step)

  # the search runs over m, the batch in units of `step`
  def report(m: int) -> dict:
    if m * step not in tried:
      tried[m * step] = try_batch(m * step)
    return tried[m * step]

  def fits(m: int) -> bool:
    return bool(report(m)["fits"])

  def used(m: int) -> float | None:
    r = report(m)
    return r.get("peak_bytes") if r["fits"] else r.get("wanted_bytes", r.get("peak_bytes"))

  def result(m: int) -> tuple[int, list[dict]]:
    return m * step, [tried[k] for k in sorted(tried)]

  top = max(1, limit // step)
  m = max(1, min(-(-start // step), top))
  if fits(m):
    lo, hi = m, None
    while hi is None:
      if lo == top:
        return result(lo)
      nxt = min(lo * 2, top)
      if fits(nxt):
        lo = nxt
      else:
        hi = nxt
  else:
    hi, lo = m, None
    while lo is None:
      if hi == 1:
        return result(0)
      nxt = hi // 2
      if fits(nxt):
        lo = nxt
      else:
        hi = nxt
  while hi - lo > 1:
    mid = (lo + hi) // 2
    u_lo, u_hi = used(lo), used(hi)
    cap = report(hi).get("limit_bytes") or report(hi).get("hbm_bytes")
    if u_lo is not None and u_hi is not None and cap and u_hi > u_lo:
      guess = lo + int((cap - u_lo) / ((u_hi - u_lo) / (hi - lo)))
      mid = min(max(guess, lo + 1), hi - 1)
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return result(lo)
