r"""Precomputes encoder outputs into annotated shards for training.

  python -m mmsr_jax.precompute --vq=VQ_RUN --input=SHARDS --output=DIR [--crop_size=512]

Adds VQ token ids of each record's maps and, with ``--crop_size`` (the SR config's
``data.hr_size``), the crop bank read with ``config.vq.ids_from='shards'``.
"""

from __future__ import annotations

from absl import app, flags

from mmsr_jax import cli
from mmsr_jax.training.precompute import precompute_shards


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("vq", "input", "output"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  precompute_shards(f.vq, f.input, f.output, batch_size=f.batch_size, crop_size=f.crop_size,
                  crops=f.crops, overwrite=f.overwrite, worker_index=f.worker_index,
                  num_workers=f.num_workers)


def define_flags() -> None:
  flags.DEFINE_string("vq", None, "A python -m mmsr_jax.train_vq workdir.")
  flags.DEFINE_string("input", None, "Folder or glob of mmsr_jax.annotate ArrayRecord shards.")
  flags.DEFINE_string("output", None, "Folder for the precomputed shards (same names).")
  flags.DEFINE_integer("batch_size", 64, "Maps encoded per call.")
  flags.DEFINE_integer("crop_size", 0, "Side of the crop bank's crops: the DiT config's "
                       "data.hr_size (for config.vq.ids_from='shards'); 0 = whole-map ids only.")
  flags.DEFINE_integer("crops", 16, "Crop boxes per record in the crop bank.")
  flags.DEFINE_bool("overwrite", False, "Replace output shards that exist.")
  flags.DEFINE_integer("worker_index", 0, "This run's share of the shards (with --num_workers).")
  flags.DEFINE_integer("num_workers", 1, "Independent runs splitting the shards (e.g. one per "
                       "TPU VM host, --worker_index=$HOST): worker i takes shards i, i+n, ...")


if __name__ == "__main__":
  cli.run(main, define_flags)
