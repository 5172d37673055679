"""``bench prepare``: images/s of the data-preparation pipelines (annotate with the tiny random
annotators, precompute with the tiny config) on Beam's local runner with 1 and 2 workers, and the
single-process loops on the same input (the pipelines' overhead on one worker). Every figure is
end to end: model loading and compilation included, as a user waits for them.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags

_IMAGES = flags.DEFINE_integer("prepare_images", 24, "Random photos made for the benchmark.")
_SHARD = flags.DEFINE_integer("prepare_shard_size", 4, "Images per shard.")
_HW = flags.DEFINE_list("prepare_hw", ["192", "256"], "Height and width of the photos.")


def _photos(folder: str, n: int, hw) -> None:
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  for i in range(n):
    small = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), np.uint8)
    Image.fromarray(small).resize((hw[1], hw[0]), Image.BICUBIC).save(
        os.path.join(folder, f"{i:04d}.png"))


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run() -> dict:
  from configs import tiny
  from mmsr_jax.data import annotator, beam_prepare
  from mmsr_jax.data.tiny_annotators import build_tiny_annotators
  from mmsr_jax.training import precompute
  n, hw = _IMAGES.value, [int(x) for x in _HW.value]
  quiet = lambda _: None  # noqa: E731
  out: dict = {"images": n, "shard_size": _SHARD.value, "image_hw": "x".join(map(str, hw)),
               "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as root:
    models = build_tiny_annotators(os.path.join(root, "models"))
    _photos(os.path.join(root, "photos"), n, hw)

    def ann(name):
      return annotator.AnnotateOptions(
          input=os.path.join(root, "photos"), output=os.path.join(root, name),
          depth=models["depth"], seg=models["seg"], caption=models["caption"],
          shard_size=_SHARD.value, batch_size=_SHARD.value)

    seconds = {"annotate_loop": _timed(lambda: annotator.run_annotation(ann("ann_loop")))}
    for w in (1, 2):
      seconds[f"annotate_beam_{w}"] = _timed(lambda w=w: beam_prepare.annotate(
          ann(f"ann_{w}"), [f"--direct_num_workers={w}"], log=quiet))
    config = tiny.get_config()
    with config.unlocked():
      config.data.source = "arrayrecord"
      config.data.path = os.path.join(root, "ann_loop")
    seconds["precompute_loop"] = _timed(lambda: precompute.precompute_shards(
        config, os.path.join(root, "ann_loop"), os.path.join(root, "pre_loop"), log=quiet))
    for w in (1, 2):
      seconds[f"precompute_beam_{w}"] = _timed(lambda w=w: beam_prepare.precompute(
          config, beam_prepare.PrecomputeOptions(os.path.join(root, "ann_loop"),
                                                 os.path.join(root, f"pre_{w}")),
          [f"--direct_num_workers={w}"], log=quiet))
  for k, v in seconds.items():
    out[f"{k}_images_per_s"] = n / v
  for what in ("annotate", "precompute"):
    out[f"{what}_speedup_2_vs_1_worker"] = seconds[f"{what}_beam_1"] / seconds[f"{what}_beam_2"]
    out[f"{what}_beam_1_vs_loop_time"] = seconds[f"{what}_beam_1"] / seconds[f"{what}_loop"]
  return out
