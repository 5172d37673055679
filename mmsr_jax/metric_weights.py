r"""Converts the public LPIPS / DISTS weights into this project's safetensors files.

  python -m mmsr_jax.metric_weights --metric=lpips_alex --backbone=alexnet-owt-7be5be79.pth
  python -m mmsr_jax.metric_weights --metric=lpips_vgg --backbone=vgg16-397923af.pth
  python -m mmsr_jax.metric_weights --metric=dists --backbone=vgg16-397923af.pth
  python -m mmsr_jax.metric_weights --metric=fid --backbone=pt_inception-2015-12-05-6726825d.pth

``--backbone`` is torchvision's ImageNet state dict (the files torchvision downloads into
``~/.cache/torch/hub/checkpoints/``), for FID pytorch-fid's Inception release file. The small
learned parts default to the copies the
``torchmetrics`` wheel ships (``functional/image/lpips_models/{alex,vgg}.pth`` — the lpips v0.1
heads — and ``functional/image/dists_models/weights.pt``); ``--heads`` names another file.
A ``.pth`` / ``.pt`` source is read here and only here, with ``torch.load(weights_only=True)``
(tensors only, never arbitrary pickled objects); ``.safetensors`` sources are read directly.
The result goes to ``--weights_dir`` (default ``~/.cache/mmsr_jax/metrics``), where
``python -m mmsr_jax.evaluate`` looks for it; an existing file is never overwritten.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from mmsr_jax import cli
from mmsr_jax.weights import params_io

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mmsr_jax", "metrics")
FILES = {"lpips_alex": "lpips_alex.safetensors", "lpips_vgg": "lpips_vgg.safetensors",
         "dists": "dists_vgg16.safetensors", "fid": "fid_inception_v3.safetensors"}
BACKBONE_FILES = {"lpips_alex": "alexnet-owt-7be5be79.pth", "lpips_vgg": "vgg16-397923af.pth",
                  "dists": "vgg16-397923af.pth", "fid": "pt_inception-2015-12-05-6726825d.pth"}


def how_to_get(metric: str, weights_dir: str) -> str:
  """One line saying which file is missing and the command that makes it."""
  path = os.path.join(weights_dir, FILES[metric])
  source = "pytorch-fid" if metric == "fid" else "torchvision"
  return (f"{metric}: weights not found at {path}; create it with python -m "
          f"mmsr_jax.metric_weights --metric={metric} --backbone=<{source} "
          f"{BACKBONE_FILES[metric]}> --weights_dir={weights_dir}")


def default_heads(metric: str) -> str | None:
  """The head / alpha-beta file inside the installed torchmetrics wheel, if there is one."""
  try:
    import importlib.util
    spec = importlib.util.find_spec("torchmetrics")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  root = os.path.join(list(spec.submodule_search_locations)[0], "functional", "image")
  rel = {"lpips_alex": "lpips_models/alex.pth", "lpips_vgg": "lpips_models/vgg.pth",
         "dists": "dists_models/weights.pt"}[metric]
  path = os.path.join(root, rel)
  return path if os.path.isfile(path) else None


def read_state_dict(path: str, field: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file, or of a .pth/.pt read with ``weights_only=True``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{field}={path}: no such file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  if not path.endswith((".pth", ".pt")):
    raise ValueError(f"--{field}={path}: expected a .safetensors, .pth or .pt file")
  import torch  # conversion-time only
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, dict):
    raise ValueError(f"--{field}={path}: expected a state dict, got {type(sd).__name__}")
  return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def convert(metric: str, backbone: str, heads: str | None = None) -> dict:
  """The ``{"params": ...}`` tree of ``metric`` from its source files."""
  from mmsr_jax.evaluation import dists, inception, lpips
  if metric not in FILES:
    raise ValueError(f"--metric={metric}: expected one of {sorted(FILES)}")
  if metric == "fid":
    return inception.torch_to_flax(read_state_dict(backbone, "backbone"))
  heads = heads or default_heads(metric)
  if heads is None:
    raise FileNotFoundError(f"--heads: not given and no torchmetrics wheel is installed to take "
                            f"the {metric} head weights from")
  sd = read_state_dict(backbone, "backbone")
  sd.update(read_state_dict(heads, "heads"))
  if metric == "dists":
    return dists.torch_to_flax(sd)
  return lpips.torch_to_flax(sd, metric.split("_")[1])


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
