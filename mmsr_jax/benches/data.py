"""``bench data``: host input-pipeline throughput per stage, decode cost per training example from
a folder of full-size photos and from precomputed crop images, and the share of a train step
spent waiting for data.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags

from mmsr_jax.benches import common


def define_flags() -> None:
  flags.DEFINE_integer("data_batch", 8, "Images per degradation batch (throughput).")
  flags.DEFINE_integer("data_crop", 512, "HR crop side (throughput).")
  flags.DEFINE_string("data_preset", "realesrgan", "Degradation preset (throughput).")
  flags.DEFINE_integer("data_steps", 20, "Timed train steps (data-wait share).")
  flags.DEFINE_string("data_degradation", "realesrgan",
                      "config.data.degradation for the data-wait measurement.")
  flags.DEFINE_integer("data_photos", 6, "Full-size (2040x1356) photos made for the "
                       "decode measurement (folder vs crop images).")


_PHOTO_HW = (1356, 2040)  # DIV2K's typical size


def _throughput() -> dict:
  """Per batch: the Grain transform (crop, kernel/parameter sampling, maps, tokens), then the
  degradation (jitted stages, and on the host its parameter packing and JPEG round trips) and
  Canny on the LR. Host work = transform + the degradation's host share + Canny (what a TPU/GPU host
  does); the jitted stages run on the default device (here the CPU too, so the end-to-end number
  is the CPU-only fallback)."""
  import numpy as np
  from mmsr_jax.data import realesrgan, sources, sr_examples
  from mmsr_jax.data.captions import make_tokenizer
  from mmsr_jax.data.modalities import canny_edges
  F = flags.FLAGS
  tok = make_tokenizer("byte")
  src = sources.DemoSource("train")
  t = sr_examples.MakeTrainingExample(F.data_crop, 4, 256, 77, tok, degradation=F.data_preset)
  deg = realesrgan.RealESRGANDegrader(F.data_preset, 4)
  b = F.data_batch
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
  deg.host_cpu_seconds = deg.jpeg_cpu_seconds = 0.0
  reps = max(1, common.REPEATS.value)
  for _ in range(reps):
    one_batch()
  n = reps * b
  total_wall, total_cpu = sum(wall.values()), sum(cpu.values())
  host_cpu = cpu["transform"] + deg.host_cpu_seconds + cpu["canny"]
  ms = lambda x: 1e3 * x / n
  return {
      # End to end on this machine (the jitted stages on the CPU as well).
      "data_images_per_s": n / total_wall,
      "data_images_per_cpu_s": n / total_cpu,  # = images/s per fully used core
      "data_cores_busy": total_cpu / total_wall,
      # What stays on the host when the stages run on an accelerator: transform, the degradation's
      # host share (parameter packing, JPEG, conversions), Canny.
      "data_host_images_per_cpu_s": n / host_cpu,
      "data_host_cpu_ms_per_image": ms(host_cpu),
      "data_transform_cpu_ms_per_image": ms(cpu["transform"]),
      "data_degrade_host_cpu_ms_per_image": ms(deg.host_cpu_seconds),
      "data_jpeg_cpu_ms_per_image": ms(deg.jpeg_cpu_seconds),
      "data_canny_cpu_ms_per_image": ms(cpu["canny"]),
      "data_jax_stages_cpu_ms_per_image": ms(cpu["degrade"] - deg.host_cpu_seconds),
      "data_crop": F.data_crop, "data_preset": F.data_preset, "data_batch": b}


def _photos(n: int) -> list:
  """``n`` DIV2K-size RGB photos made from the scikit-image samples (no download)."""
  import cv2
  import numpy as np
  import skimage.data
  names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
  out = []
  for i in range(n):
    img = getattr(skimage.data, names[i % len(names)])()[..., :3]
    img = cv2.resize(img, _PHOTO_HW[::-1], interpolation=cv2.INTER_CUBIC)
    out.append(np.ascontiguousarray(img if i < len(names) else img[::-1]))
  return out


def _decode() -> dict:
  """CPU time per training example of reading + decoding its record and cutting the crop
  (``MakeTrainingExample``: crop, flip, degradation parameters, maps, tokens), from a folder of
  full-size PNGs and from precompute shards with crop images (PNG and JPEG). With the host JPEG +
  Canny of the degradation (measured by ``_throughput``) this is the host pipeline per example."""
  import cv2
  import numpy as np
  from array_record.python.array_record_module import ArrayRecordWriter
  from mmsr_jax.schema.sr import sr_config
  from mmsr_jax.data import sources, sr_examples
  from mmsr_jax.data.captions import make_tokenizer
  from mmsr_jax.formats.records import SHARD_PATTERN, encode_record
  from mmsr_jax.training.encoder_pass import precompute_shards
  F = flags.FLAGS
  root = tempfile.mkdtemp(prefix="bench_decode_")
  photos = _photos(F.data_photos)
  os.makedirs(os.path.join(root, "folder"))
  os.makedirs(os.path.join(root, "ann"))
  writer = ArrayRecordWriter(os.path.join(root, "ann", SHARD_PATTERN.format(0, 1)),
                             "group_size:1")
  for i, img in enumerate(photos):
    cv2.imwrite(os.path.join(root, "folder", f"{i:04d}.png"), img[..., ::-1])
    writer.write(encode_record(img, {"caption": f"photo {i}"}, {"name": f"{i:04d}"}))
  writer.close()
  size, crops = F.data_crop, 16
  cfg = sr_config()
  cfg.data.hr_size, cfg.data.map_size = size, 256
  for enc in ("png", "jpeg"):
    precompute_shards(cfg, os.path.join(root, "ann"), os.path.join(root, enc), features=("crops",),
                      crop_size=size, crops=crops, crop_encoding=enc, log=lambda _: None)
  tok = make_tokenizer("byte")
  kinds = {"folder": (sources.FolderSource(os.path.join(root, "folder")), "encoder"),
           "shard_full": (sources.ArrayRecordSource(os.path.join(root, "ann")), "encoder")}
  for enc in ("png", "jpeg"):
    kinds[f"crops_{enc}"] = (sources.ArrayRecordSource(os.path.join(root, enc), crops_only=True),
                             "shards")
  out = {"data_decode_photo_hw": list(_PHOTO_HW), "data_decode_photos": len(photos)}
  for name in ("ann", "png", "jpeg"):  # shard bytes per record
    shard = os.path.join(root, name, SHARD_PATTERN.format(0, 1))
    out[f"data_record_mb_{name}"] = os.path.getsize(shard) / len(photos) / 1e6
  reps = max(2, common.REPEATS.value)
  for name, (src, ids_from) in kinds.items():
    make = sr_examples.MakeTrainingExample(size, 4, 256, 77, tok, degradation=F.data_preset,
                                           ids_from=ids_from)
    read = build = 0.0
    n = 0
    for r in range(reps):
      for i in range(len(src)):
        c0 = time.process_time()
        rec = src[i]
        c1 = time.process_time()
        make.random_map(rec, np.random.default_rng([r, i]))
        c2 = time.process_time()
        read, build, n = read + c1 - c0, build + c2 - c1, n + 1
    out[f"data_{name}_read_cpu_ms_per_image"] = 1e3 * read / n
    out[f"data_{name}_example_cpu_ms_per_image"] = 1e3 * build / n
  return out


def _per_core(out: dict) -> None:
  """Host images/s per core of the whole pipeline per input format: read + decode + example
  (``_decode``) + the degradation's host share + Canny (``_throughput``)."""
  rest = out["data_degrade_host_cpu_ms_per_image"] + out["data_canny_cpu_ms_per_image"]
  for name in ("folder", "shard_full", "crops_png", "crops_jpeg"):
    ms = (out[f"data_{name}_read_cpu_ms_per_image"]
          + out[f"data_{name}_example_cpu_ms_per_image"] + rest)
    out[f"data_host_{name}_cpu_ms_per_image"] = ms
    out[f"data_host_{name}_images_per_cpu_s"] = 1e3 / ms


def _wait_share() -> dict:
  import jax
  from mmsr_jax.runtime import sharding
  from mmsr_jax.data import sr_examples
  from mmsr_jax.training.sr_task import SRTask
  F = flags.FLAGS
  cfg = common.CONFIG.value
  if cfg is None:
    from configs import tiny
    cfg = tiny.get_config()
  cfg.data.degradation = F.data_degradation
  # operator maps from the LR exist only for the simple degradation
  if F.data_degradation != "simple":
    cfg.data.maps_from = "record"
  workdir = tempfile.mkdtemp(prefix="bench_data_")
  trainer = SRTask(cfg, workdir)
  state = trainer.init_state()
  it = iter(sr_examples.make_train_loader(cfg, trainer.system.tokenizer))
  # Warm-up: compile the step (and the degradation).
  state, metrics = trainer.train_step(state, trainer.frozen, sharding.global_batch(next(it),
                                                                                  trainer.mesh))
  jax.block_until_ready(metrics)
  wait = total = 0.0
  for _ in range(F.data_steps):
    t0 = time.perf_counter()
    batch = next(it)
    t1 = time.perf_counter()
    state, metrics = trainer.train_step(state, trainer.frozen,
                                        sharding.global_batch(batch, trainer.mesh))
    jax.block_until_ready(metrics)
    t2 = time.perf_counter()
    wait += t1 - t0
    total += t2 - t0
  return {"wait_share": wait / total, "step_s": total / F.data_steps,
          "wait_s_per_step": wait / F.data_steps, "wait_degradation": F.data_degradation,
          "wait_batch": int(cfg.batch_size), "wait_hr_size": int(cfg.data.hr_size)}


def run() -> dict:
  out = {"host_cpus": os.cpu_count()}
  out.update(_throughput())
  out.update(_decode())
  _per_core(out)
  out.update(_wait_share())
  return out
