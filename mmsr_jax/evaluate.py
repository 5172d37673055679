r"""Scores super-resolved images against ground truth, as the diffusion-SR papers do.

  python -m mmsr_jax.evaluate --pred=DIR --gt=DIR [--lr=DIR] [--json=FILE] [--csv=FILE]
  python -m mmsr_jax.evaluate --benchmark=DIR --workdir=RUN --output=DIR
"""

from __future__ import annotations

import os

from absl import flags

from mmsr_jax import cli
from mmsr_jax.data import images as image_io
from mmsr_jax.inference.quality import (LEARNED, evaluate, markdown_table, refuse_existing,
                                        run_and_score, write_results)
from mmsr_jax.weights.metric_nets import DEFAULT_DIR


def define_flags() -> None:
  flags.DEFINE_string("pred", None, "folder of super-resolved images")
  flags.DEFINE_string("gt", None, "folder of ground-truth images (matched by file name)")
  flags.DEFINE_string("lr", None, "folder of LR images: adds the bicubic baseline row")
  flags.DEFINE_string("json", None, "write the result as JSON here")
  flags.DEFINE_string("csv", None, "write the per-image scores as CSV here")
  flags.DEFINE_string("markdown", None, "write the Markdown table here")
  flags.DEFINE_integer("crop_border", 0, "pixels cut at each border for PSNR/SSIM")
  flags.DEFINE_alias("crop-border", "crop_border")
  flags.DEFINE_string("weights_dir", DEFAULT_DIR, "converted LPIPS / DISTS weights "
                      "(python -m mmsr_jax.metric_weights)")
  flags.DEFINE_list("learned", list(LEARNED), "learned metrics to try: lpips, lpips_vgg, dists, "
                    "fid (empty: none)")
  flags.DEFINE_integer("batch_size", 8, "image pairs per jitted call")
  flags.DEFINE_enum("niqe_color", "yiq", ["yiq", "ycbcr"], "NIQE luminance: yiq (pyiqa, the "
                    "published numbers) or ycbcr (BasicSR)")
  flags.DEFINE_string("benchmark", None, "folder with test_LR/ and test_HR/: run --workdir's "
                      "model on test_LR, then score")
  flags.DEFINE_string("workdir", None, "trained run (benchmark mode)")
  flags.DEFINE_string("output", None, "where benchmark mode writes the super-resolved images")
  flags.DEFINE_string("name", "ours", "row label of the evaluated method")
  flags.DEFINE_bool("overwrite", False, "replace existing output files")
  flags.DEFINE_integer("max_pixels", image_io.DEFAULT_MAX_PIXELS, "largest image read (pixels, checked "
                       "from each file's header before decoding)")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  unknown = [m for m in f.learned if m not in LEARNED]
  if unknown:
    raise ValueError(f"--learned: unknown {unknown}; expected a subset of {list(LEARNED)}")
  kwargs = dict(crop_border=f.crop_border, weights_dir=f.weights_dir, batch_size=f.batch_size,
                niqe_color=f.niqe_color, learned_metrics=tuple(f.learned),
                max_pixels=image_io.check_limit(f.max_pixels, "--max_pixels"))
  if f.benchmark:
    if not f.workdir or not f.output:
      raise ValueError("--benchmark needs --workdir (the trained run) and --output (where the "
                       "super-resolved images go)")
    if f.pred or f.gt:
      raise ValueError("--benchmark takes its inputs from DIR/test_LR and DIR/test_HR; drop "
                       "--pred / --gt")
    json_path = f.json or os.path.join(f.output, "metrics.json")
    csv_path = f.csv or os.path.join(f.output, "metrics.csv")
    md_path = f.markdown or os.path.join(f.output, "metrics.md")
    refuse_existing([json_path, csv_path, md_path], f.overwrite)
    result = run_and_score(f.benchmark, f.workdir, f.output, overwrite=f.overwrite, **kwargs)
  else:
    if not f.pred or not f.gt:
      raise ValueError("give --pred=DIR and --gt=DIR (or --benchmark=DIR --workdir=RUN "
                       "--output=DIR)")
    json_path, csv_path, md_path = f.json, f.csv, f.markdown
    refuse_existing([json_path, csv_path, md_path], f.overwrite)
    result = evaluate(f.pred, f.gt, f.lr, **kwargs)
  table = markdown_table(result, f.name)
  print(table)
  print(f"{result['num_images']} images scored in {result['seconds']:.2f} s")
  write_results(result, f.name, table, json_path=json_path, csv_path=csv_path, md_path=md_path)


if __name__ == "__main__":
  cli.run(main, define_flags)
