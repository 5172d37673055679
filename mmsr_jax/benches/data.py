"""``bench data``: host input-pipeline throughput per stage, and the share of a train step spent
waiting for data.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags

from mmsr_jax.benches import common

_BATCH = flags.DEFINE_integer("data_batch", 8, "Images per degradation batch (throughput).")
_SIZE = flags.DEFINE_integer("data_crop", 512, "HR crop side (throughput).")
_PRESET = flags.DEFINE_string("data_preset", "realesrgan", "Degradation preset (throughput).")
_STEPS = flags.DEFINE_integer("data_steps", 20, "Timed train steps (data-wait share).")
_DEGR = flags.DEFINE_string("data_degradation", "realesrgan",
                            "config.data.degradation for the data-wait measurement.")


def _throughput() -> dict:
  """Per batch: the Grain transform (crop, kernel/parameter sampling, maps, tokens), then the
  degradation (jitted stages + host JPEG) and Canny on the LR. Host work = transform + JPEG +
  Canny (what a TPU/GPU host does); the jitted stages run on the default device (here the CPU
  too, so the end-to-end number is the CPU-only fallback)."""
  import numpy as np
  from mmsr_jax.data import realesrgan, sources, sr_examples
  from mmsr_jax.data.captions import make_tokenizer
  from mmsr_jax.data.modalities import canny_edges
  tok = make_tokenizer("byte")
  src = sources.DemoSource("train")
  t = sr_examples.MakeTrainingExample(_SIZE.value, 4, 256, 77, tok, degradation=_PRESET.value)
  deg = realesrgan.RealESRGANDegrader(_PRESET.value, 4)
  b = _BATCH.value
  counter = [0]
  wall = {"transform": 0.0, "degrade": 0.0, "canny": 0.0}
  cpu = dict(wall)

  def one_batch():
    marks = [(time.perf_counter(), time.process_time())]
    exs = [t.random_map(src[(counter[0] + i) % len(src)], np.random.default_rng(counter[0] + i))
           for i in range(b)]
    counter[0] += b
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    params = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("deg_")}
    marks.append((time.perf_counter(), time.process_time()))
    lr = deg((batch["hr"] + 1) * 0.5, params)
    marks.append((time.perf_counter(), time.process_time()))
    for x in lr:
      canny_edges(x, 256)
    marks.append((time.perf_counter(), time.process_time()))
    for name, (a, z) in zip(wall, zip(marks[:-1], marks[1:])):
      wall[name] += z[0] - a[0]
      cpu[name] += z[1] - a[1]
    return lr

  one_batch()  # compile the degradation outside the measurement
  for d in (wall, cpu):
    for k in d:
      d[k] = 0.0
  deg.jpeg_seconds = deg.jpeg_cpu_seconds = 0.0
  reps = max(1, common.REPEATS.value)
  for _ in range(reps):
    one_batch()
  n = reps * b
  total_wall, total_cpu = sum(wall.values()), sum(cpu.values())
  host_cpu = cpu["transform"] + deg.jpeg_cpu_seconds + cpu["canny"]
  ms = lambda x: 1e3 * x / n
  return {
      # End to end on this machine (the jitted stages on the CPU as well).
      "data_images_per_s": n / total_wall,
      "data_images_per_cpu_s": n / total_cpu,  # = images/s per fully used core
      "data_cores_busy": total_cpu / total_wall,
      # What stays on the host when the stages run on an accelerator: transform + JPEG + Canny.
      "data_host_images_per_cpu_s": n / host_cpu,
      "data_host_cpu_ms_per_image": ms(host_cpu),
      "data_transform_cpu_ms_per_image": ms(cpu["transform"]),
      "data_jpeg_cpu_ms_per_image": ms(deg.jpeg_cpu_seconds),
      "data_canny_cpu_ms_per_image": ms(cpu["canny"]),
      "data_jax_stages_cpu_ms_per_image": ms(cpu["degrade"] - deg.jpeg_cpu_seconds),
      "data_crop": _SIZE.value, "data_preset": _PRESET.value, "data_batch": b}


def _wait_share() -> dict:
  import jax
  from mmsr_jax.runtime import sharding
  from mmsr_jax.data import sr_examples
  from mmsr_jax.training.sr_task import SRTask
  cfg = common.CONFIG.value
  if cfg is None:
    from configs import tiny
    cfg = tiny.get_config()
  cfg.data.degradation = _DEGR.value
  workdir = tempfile.mkdtemp(prefix="bench_data_")
  trainer = SRTask(cfg, workdir)
  state = trainer.init_state()
  it = iter(sr_examples.make_train_loader(cfg, trainer.tokenizer))
  # Warm-up: compile the step (and the degradation).
  state, metrics = trainer.train_step(state, trainer.frozen, sharding.global_batch(next(it),
                                                                                  trainer.mesh))
  jax.block_until_ready(metrics)
  wait = total = 0.0
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    batch = next(it)
    t1 = time.perf_counter()
    state, metrics = trainer.train_step(state, trainer.frozen,
                                        sharding.global_batch(batch, trainer.mesh))
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    wait += t1 - t0
    total += t2 - t0
  return {"wait_share": wait / total, "step_s": total / _STEPS.value,
          "wait_s_per_step": wait / _STEPS.value, "wait_degradation": _DEGR.value,
          "wait_batch": int(cfg.batch_size), "wait_hr_size": int(cfg.data.hr_size)}


def run() -> dict:
  out = {"host_cpus": os.cpu_count()}
  out.update(_throughput())
  out.update(_wait_share())
  return out
