"""``bench prepare``: images/s of the data-preparation pipelines (annotate with the tiny random
annotators, precompute with the tiny config) on Beam's local runner with 1 and 2 workers, and the
single-process loops on the same input (the pipelines' overhead on one worker). Every figure is
end to end (worker start, model loading included) with a warm JAX compilation cache: a first
pass over one shard compiles the jitted programs (the LR degradation, the encoders) into a
cache folder that every process of the timed runs reads, as the workers of a long job
compile once and then run for hours (``--prepare_warm=false`` times the cold start instead).
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags

_IMAGES = flags.DEFINE_integer("prepare_images", 24, "Random photos made for the benchmark.")
_SHARD = flags.DEFINE_integer("prepare_shard_size", 4, "Images per shard.")
_HW = flags.DEFINE_list("prepare_hw", ["192", "256"], "Height and width of the photos.")
_WARM = flags.DEFINE_bool("prepare_warm", True, "Fill a JAX compilation cache first (see the "
                          "module docstring).")


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
               "cpu_count": os.cpu_count(), "warm_compilation_cache": _WARM.value}
  with tempfile.TemporaryDirectory() as root:
    models = build_tiny_annotators(os.path.join(root, "models"))
    _photos(os.path.join(root, "photos"), n, hw)
    config = tiny.get_config()
    if _WARM.value:
      import jax
      cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
      jax.config.update("jax_compilation_cache_dir", cache)  # the workers read the variable
      _photos(os.path.join(root, "warm"), _SHARD.value, hw)
      warm = annotator.AnnotateOptions(
          input=os.path.join(root, "warm"), output=os.path.join(root, "warm_ann"),
          depth=models["depth"], seg=models["seg"], caption=models["caption"],
          shard_size=_SHARD.value, batch_size=_SHARD.value)
      annotator.run_annotation(warm)
      precompute.precompute_shards(config, warm.output, os.path.join(root, "warm_pre"),
                                   log=quiet)

    def ann(name):
      return annotator.AnnotateOptions(
          input=os.path.join(root, "photos"), output=os.path.join(root, name),
          depth=models["depth"], seg=models["seg"], caption=models["caption"],
          shard_size=_SHARD.value, batch_size=_SHARD.value)

    seconds = {"annotate_loop": _timed(lambda: annotator.run_annotation(ann("ann_loop")))}
    for w in (1, 2):
      seconds[f"annotate_beam_{w}"] = _timed(lambda w=w: beam_prepare.annotate(
          ann(f"ann_{w}"), [f"--direct_num_workers={w}"], log=quiet))
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
