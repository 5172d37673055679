r"""Precomputes the frozen encoders' outputs into annotated shards, for training without them,
as an Apache Beam pipeline (``mmsr_jax.training.encoder_pass_beam``): locally on every core by
default, on a cluster with Beam's runner options (``--runner=DataflowRunner --project=...``).

  python -m mmsr_jax.precompute --config=configs/dit_l.py --input=ANNOTATED --output=DIR

Writes, per record, the VQ token ids (whole maps and a crop bank of ``--crops`` boxes of the
config's ``data.hr_size``), the HR latents of the bank's boxes, the caption's T5 states and the
bank's crops re-encoded on their own (``--crop_encoding``), with the encoders named by the
config (``--vq=RUN`` takes the tokenizer of a train_vq run).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from mmsr_jax import cli
from mmsr_jax.formats.records import CROP_ENCODINGS, list_shards
from mmsr_jax.schema import tasks
from mmsr_jax.training.encoder_pass import FEATURES, STORE_DTYPES, with_vq_run


def main(argv):
  from mmsr_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
  from mmsr_jax.training import encoder_pass_beam  # pylint: disable=g-import-not-at-top
  beam_args = beam_prepare.check_beam_args(argv[1:])
  f = flags.FLAGS
  for name in ("input", "output"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  if beam_prepare.is_local(f.input):
    list_shards(f.input, "--input")  # the cheap checks first
  config = f.config
  tasks.validate(config)
  if f.vq:
    config = with_vq_run(config, f.vq)
  encoder_pass_beam.precompute(config, encoder_pass_beam.PrecomputeOptions(
      f.input, f.output, features=tuple(f.features), batch_size=f.batch_size,
      crop_size=None if f.crop_size < 0 else f.crop_size, crops=f.crops, dtype=f.dtype,
      crop_encoding=f.crop_encoding, overwrite=f.overwrite), beam_args)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "configs/tiny.py", "The SR config whose encoders and sizes the features are "
      "for; override fields with --config.field=value.", lock_config=True)
  flags.DEFINE_string("vq", None, "A python -m mmsr_jax.train_vq workdir: its tokenizer "
                      "replaces config.vq (weights, architecture, map size).")
  flags.DEFINE_string("input", None, "Folder or glob of mmsr_jax.annotate ArrayRecord shards.")
  flags.DEFINE_string("output", None, "Folder for the precomputed shards (same names).")
  flags.DEFINE_list("features", list(FEATURES), "What to write: vq (token ids and their crop "
                    "bank), text (caption states), latents (HR latents of the bank's boxes), crops (the "
                    "bank's HR crops as images: training decodes one crop, not the photo).")
  flags.DEFINE_enum("dtype", "bfloat16", list(STORE_DTYPES), "Stored dtype of the features.")
  flags.DEFINE_integer("batch_size", 64, "Maps / crops / captions encoded per call.")
  flags.DEFINE_integer("crop_size", -1, "Side of the crop bank's crops (-1: the config's "
                       "data.hr_size; 0: whole-map ids only, no bank).")
  flags.DEFINE_integer("crops", 16, "Crop boxes per record in the crop bank.")
  flags.DEFINE_enum("crop_encoding", "png", list(CROP_ENCODINGS), "How --features=crops stores "
                    "each crop: png (lossless) or jpeg (quality 95, faster to decode; the HR "
                    "latents are then those of the JPEG crop).")
  flags.DEFINE_bool("overwrite", False, "Redo every shard (default: a rerun with the same "
                    "settings and encoders writes only the missing shards).")


if __name__ == "__main__":
  cli.run(main, define_flags, pass_unknown=True)
