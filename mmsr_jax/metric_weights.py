r"""Converts the public LPIPS / DISTS / FID Inception weights into this project's files.

  python -m mmsr_jax.metric_weights --metric=lpips_alex --backbone=alexnet-owt-7be5be79.pth
  python -m mmsr_jax.metric_weights --metric=fid --backbone=pt_inception-2015-12-05-6726825d.pth

A ``.pth`` source is read here only, with ``torch.load(weights_only=True)``; an existing output
is never overwritten.
"""

from __future__ import annotations

import os

from absl import flags

from mmsr_jax import cli
from mmsr_jax.weights import params_io
from mmsr_jax.weights.metric_nets import DEFAULT_DIR, FILES, convert


def define_flags() -> None:
  flags.DEFINE_enum("metric", None, sorted(FILES), "which metric's weights to convert")
  flags.DEFINE_string("backbone", None, "torchvision AlexNet / VGG16 state dict, or pytorch-fid's "
                      "Inception for fid (.pth or .safetensors)")
  flags.DEFINE_string("heads", None, "LPIPS heads / DISTS alpha-beta file (default: the copy in "
                      "the torchmetrics wheel)")
  flags.DEFINE_string("weights_dir", DEFAULT_DIR, "where the converted file goes")
  flags.mark_flags_as_required(["metric", "backbone"])


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  out = os.path.join(os.path.expanduser(f.weights_dir), FILES[f.metric])
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; remove it first to convert again")
  params_io.save_params(out, convert(f.metric, f.backbone, f.heads))
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
