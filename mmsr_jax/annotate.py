r"""Extracts the context modalities of a set of images into ArrayRecord shards, as an Apache
Beam pipeline (``mmsr_jax.data.beam_prepare``): locally on every core by default, on a cluster
with Beam's runner options (``--runner=DataflowRunner --project=... --region=...``).

  python -m mmsr_jax.annotate --input=DIR_OR_tfds:NAME[:SPLIT] --output=DIR \
      --depth=depth-anything/Depth-Anything-V2-Small-hf \
      --seg=facebook/mask2former-swin-tiny-ade-semantic \
      --caption=Salesforce/blip-image-captioning-base --caption_kind=blip
"""

from __future__ import annotations

import dataclasses

from absl import flags

from mmsr_jax import cli
from mmsr_jax.data.annotator import CAPTION_KINDS, AnnotateOptions
from mmsr_jax.data.images import DEFAULT_MAX_PIXELS


def define_flags() -> None:
  flags.DEFINE_string("input", None, "Image folder (recursive) or tfds:NAME[:SPLIT].")
  flags.DEFINE_string("output", None, "Output folder for the ArrayRecord shards.")
  flags.DEFINE_string("depth", "", "Depth Anything model folder or hub id ('' = none).")
  flags.DEFINE_string("seg", "", "Mask2Former model folder or hub id ('' = none).")
  flags.DEFINE_string("caption", "", "Image-to-text model folder or hub id ('' = none).")
  flags.DEFINE_enum("caption_kind", "blip", CAPTION_KINDS, "Caption model family.")
  flags.DEFINE_bool("from_hr", False,
                    "Extract modalities from the HR image instead of a degraded LR version.")
  flags.DEFINE_string("preset", "realesrgan", "Degradation preset for the LR version.")
  flags.DEFINE_integer("scale", 4, "Downscaling factor of the LR version.")
  flags.DEFINE_integer("seed", 0, "Seed of the LR degradations.")
  flags.DEFINE_integer("shard_size", 256, "Images per ArrayRecord shard.")
  flags.DEFINE_integer("batch_size", 8, "Images per annotator batch.")
  flags.DEFINE_string("device", "cpu", "torch device for the annotators (cuda on GPU workers).")
  flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir ('' = default).")
  flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "Largest image read (pixels, checked "
                       "from each file's header before decoding; larger ones are skipped).")


def main(argv) -> None:
  from mmsr_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
  names = [f.name for f in dataclasses.fields(AnnotateOptions)]
  opts = AnnotateOptions(**{n: getattr(flags.FLAGS, n) for n in names})
  beam_prepare.annotate(opts, beam_prepare.check_beam_args(argv[1:]))


if __name__ == "__main__":
  cli.run(main, define_flags, pass_unknown=True)
