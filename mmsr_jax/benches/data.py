"""``python -m mmsr_jax.bench data``: host input-pipeline throughput and data-wait share.

1. Throughput: images/s of the full training transform (512x512 crop, context maps, tokens and
   the full Real-ESRGAN degradation, JPEG included) over the demo photos in one process,
   reported per busy CPU core (process CPU time / wall time), plus the host-only share (transform
   + JPEG + Canny, per thread: what each Grain worker / core of an accelerator host delivers)
   and the time of the jitted stages (on the default device; on CPU they compete with the host).
2. Data wait: the tiny config's train loop (``--config``, default configs/tiny.py), timing how
   long each step blocks in ``next(iterator)`` against the whole step; reported as the share of
   step time spent waiting for data, for the configured degradation (``--data_degradation``).
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
  from mmsr_jax.data import pipeline
  from mmsr_jax.text_tokenizer import make_tokenizer
  tok = make_tokenizer("byte")
  src = pipeline.DemoSource("train")
  t = pipeline.MakeTrainingExample(_SIZE.value, 4, 256, 77, tok, degradation=_PRESET.value)
  deg = pipeline.realesrgan.RealESRGANDegrader(_PRESET.value, 4)
  b = _BATCH.value
  counter = [0]
  times = {"transform": 0.0, "degrade": 0.0, "canny": 0.0}

  def one_batch():
    t0 = time.perf_counter()
    exs = [t.random_map(src[(counter[0] + i) % len(src)], np.random.default_rng(counter[0] + i))
           for i in range(b)]
    counter[0] += b
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    params = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("deg_")}
    t1 = time.perf_counter()
    lr = deg((batch["hr"] + 1) * 0.5, params)
    t2 = time.perf_counter()
    for x in lr:
      pipeline.canny_edges(x, 256)
    t3 = time.perf_counter()
    times["transform"] += t1 - t0
    times["degrade"] += t2 - t1
    times["canny"] += t3 - t2
    return lr

  one_batch()  # compile the degradation outside the measurement
  for k in times:
    times[k] = 0.0
  deg.jpeg_seconds = 0.0
  reps = max(1, common.REPEATS.value)
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(reps):
    one_batch()
  wall = time.perf_counter() - w0
  cores = (time.process_time() - c0) / wall
  n = reps * b
  host = times["transform"] + deg.jpeg_seconds + times["canny"]
  return {"data_images_per_s": n / wall,
          "data_cores_busy": cores,
          "data_images_per_s_per_core": n / wall / max(cores, 1e-9),
          "data_host_images_per_s_per_thread": n / host,
          "data_host_ms_per_image": 1e3 * host / n,
          "data_transform_ms_per_image": 1e3 * times["transform"] / n,
          "data_jpeg_ms_per_image": 1e3 * deg.jpeg_seconds / n,
          "data_canny_ms_per_image": 1e3 * times["canny"] / n,
          "data_jax_stages_ms_per_image": 1e3 * (times["degrade"] - deg.jpeg_seconds) / n,
          "data_crop": _SIZE.value, "data_preset": _PRESET.value}


def _wait_share() -> dict:
  import jax
  from mmsr_jax import sharding
  from mmsr_jax.data import pipeline
  from mmsr_jax.train import Trainer
  cfg = common.CONFIG.value
  if cfg is None:
    from configs import tiny
    cfg = tiny.get_config()
  cfg.data.degradation = _DEGR.value
  workdir = tempfile.mkdtemp(prefix="bench_data_")
  trainer = Trainer(cfg, workdir)
  state = trainer.init_state()
  it = iter(pipeline.make_train_loader(cfg, trainer.tokenizer))
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
