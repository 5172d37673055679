"""``bench prepare``: images/s of the data-preparation pipelines (annotate with the tiny random
annotators, precompute with the tiny config) on Beam's local runner with 1 and 2 workers, and the
single-process loops on the same input (the pipelines' overhead on one worker). Each run is
timed on n and on 2n photos: ``*_images_per_s`` is end to end on 2n (worker start and model
loading included), ``*_marginal_images_per_s`` is n over the difference of the two times (what a
long job gets once its workers run), and the ratios compare marginal rates. A first pass over
one shard fills a JAX compilation cache (the LR degradation, the encoders) that every process of
the timed runs reads, as the workers of a long job compile once and then run for hours
(``--prepare_warm=false`` times the cold start instead).
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import flags


def define_flags() -> None:
  flags.DEFINE_integer("prepare_images", 24, "Random photos made for the benchmark.")
  flags.DEFINE_integer("prepare_shard_size", 4, "Images per shard.")
  flags.DEFINE_list("prepare_hw", ["192", "256"], "Height and width of the photos.")
  flags.DEFINE_bool("prepare_warm", True, "Fill a JAX compilation cache first (see the "
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
  from mmsr_jax.training import encoder_pass, encoder_pass_beam
  F = flags.FLAGS
  n, hw = F.prepare_images, [int(x) for x in F.prepare_hw]
  quiet = lambda _: None  # noqa: E731
  out: dict = {"images": n, "shard_size": F.prepare_shard_size, "image_hw": "x".join(map(str, hw)),
               "cpu_count": os.cpu_count(), "warm_compilation_cache": F.prepare_warm}
  with tempfile.TemporaryDirectory() as root:
    models = build_tiny_annotators(os.path.join(root, "models"))
    # The same photos, once and twice over: the difference of the two times is the time of n
    # more images without the fixed start of a run (worker processes, imports, model loading).
    _photos(os.path.join(root, "photos_1"), n, hw)
    _photos(os.path.join(root, "photos_2"), 2 * n, hw)
    config = tiny.get_config()
    if F.prepare_warm:
      import jax
      cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
      jax.config.update("jax_compilation_cache_dir", cache)  # the workers read the variable
      _photos(os.path.join(root, "warm"), F.prepare_shard_size, hw)
      warm = annotator.AnnotateOptions(
          input=os.path.join(root, "warm"), output=os.path.join(root, "warm_ann"),
          depth=models["depth"], seg=models["seg"], caption=models["caption"],
          shard_size=F.prepare_shard_size, batch_size=F.prepare_shard_size)
      annotator.run_annotation(warm)
      encoder_pass.precompute_shards(config, warm.output, os.path.join(root, "warm_pre"),
                                     log=quiet)

    def ann(k, name):
      return annotator.AnnotateOptions(
          input=os.path.join(root, f"photos_{k}"), output=os.path.join(root, f"{name}_{k}"),
          depth=models["depth"], seg=models["seg"], caption=models["caption"],
          shard_size=F.prepare_shard_size, batch_size=F.prepare_shard_size)

    seconds = {}
    for k in (1, 2):
      seconds[f"annotate_loop_{k}"] = _timed(lambda k=k: annotator.run_annotation(
          ann(k, "ann_loop")))
      for w in (1, 2):
        seconds[f"annotate_beam_{w}_{k}"] = _timed(lambda w=w, k=k: beam_prepare.annotate(
            ann(k, f"ann_{w}"), [f"--direct_num_workers={w}"], log=quiet))
      ann_dir = os.path.join(root, f"ann_loop_{k}")
      seconds[f"precompute_loop_{k}"] = _timed(
          lambda d=ann_dir, k=k: encoder_pass.precompute_shards(
              config, d, os.path.join(root, f"pre_loop_{k}"), log=quiet))
      for w in (1, 2):
        seconds[f"precompute_beam_{w}_{k}"] = _timed(lambda w=w, k=k, d=ann_dir:
            encoder_pass_beam.precompute(config, encoder_pass_beam.PrecomputeOptions(
                d, os.path.join(root, f"pre_{w}_{k}")), [f"--direct_num_workers={w}"],
                log=quiet))
  for what in ("annotate", "precompute"):
    for run_ in ("loop", "beam_1", "beam_2"):
      t1, t2 = seconds[f"{what}_{run_}_1"], seconds[f"{what}_{run_}_2"]
      out[f"{what}_{run_}_images_per_s"] = 2 * n / t2  # end to end, 2n images
      out[f"{what}_{run_}_seconds_n_2n"] = f"{t1:.1f}, {t2:.1f}"
      # None when n more images took no measurable time: the start hid them (raise n).
      out[f"{what}_{run_}_marginal_images_per_s"] = n / (t2 - t1) if t2 > t1 else None
    if None in [out[f"{what}_{r}_marginal_images_per_s"] for r in ("loop", "beam_1", "beam_2")]:
      continue
    marginal = lambda r: out[f"{what}_{r}_marginal_images_per_s"]  # noqa: E731,B023
    out[f"{what}_speedup_2_vs_1_worker"] = marginal("beam_2") / marginal("beam_1")
    out[f"{what}_beam_1_vs_loop_time"] = marginal("loop") / marginal("beam_1")
  return out
