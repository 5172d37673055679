"""Weights of the metric networks (LPIPS AlexNet / VGG, DISTS, the FID Inception) from their
public torchvision / pytorch-fid / torchmetrics files, and where ``evaluate`` looks for them."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from mmsr_jax.evaluation import dists, inception, lpips

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
  if metric not in FILES:
    raise ValueError(f"--metric={metric}: expected one of {sorted(FILES)}")
  if metric == "fid":
    return inception_from_torch(read_state_dict(backbone, "backbone"))
  heads = heads or default_heads(metric)
  if heads is None:
    raise FileNotFoundError(f"--heads: not given and no torchmetrics wheel is installed to take "
                            f"the {metric} head weights from")
  sd = read_state_dict(backbone, "backbone")
  sd.update(read_state_dict(heads, "heads"))
  if metric == "dists":
    return dists_from_torch(sd)
  return lpips_from_torch(sd, metric.split("_")[1])


def lpips_from_torch(sd: dict[str, np.ndarray], net: str) -> dict:
  """LPIPS parameters from a torchvision backbone state dict (``features.N.weight`` ...) merged
  with the lpips heads (``linK.model.1.weight`` or ``linK.model.0.weight``, shape 1xCx1x1).

  Returns the ``{"params": ...}`` tree; missing or misshaped keys are a ValueError naming them.
  """
  params: dict = {"net": {}}
  for layer in lpips.LAYOUTS[net]:
    if layer[0] != "conv":
      continue
    idx, ch, k = layer[1], layer[2], layer[3]
    wkey, bkey = f"features.{idx}.weight", f"features.{idx}.bias"
    for key in (wkey, bkey):
      if key not in sd:
        raise ValueError(f"backbone state dict has no {key!r} (expected torchvision "
                         f"{'alexnet' if net == 'alex' else 'vgg16'} keys)")
    w = np.asarray(sd[wkey], np.float32)
    if w.shape[0] != ch or w.shape[2:] != (k, k):
      raise ValueError(f"{wkey}: shape {w.shape}, expected ({ch}, *, {k}, {k})")
    params["net"][f"features_{idx}"] = {
        "kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
        "bias": np.asarray(sd[bkey], np.float32)}
  for k, ch in enumerate(lpips.CHANNELS[net]):
    cands = [f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"]
    key = next((c for c in cands if c in sd), None)
    if key is None:
      raise ValueError(f"LPIPS heads: no {cands[0]!r} in the state dict")
    w = np.asarray(sd[key], np.float32).reshape(-1)
    if w.shape != (ch,):
      raise ValueError(f"{key}: {w.size} values, expected {ch}")
    params[f"lin{k}"] = w
  return {"params": params}


def dists_from_torch(sd: dict[str, np.ndarray]) -> dict:
  """DISTS parameters from a torchvision VGG16 state dict (``features.N.weight``) merged with
  DISTS' ``alpha`` / ``beta`` (shape 1x1475x1x1). Returns the ``{"params": ...}`` tree."""
  net = {}  # the same names as LPIPS-VGG's backbone
  for layer in lpips.VGG16:
    if layer[0] == "conv":
      idx, ch = layer[1], layer[2]
      for key in (f"features.{idx}.weight", f"features.{idx}.bias"):
        if key not in sd:
          raise ValueError(f"backbone state dict has no {key!r} (expected torchvision vgg16 keys)")
      w = np.asarray(sd[f"features.{idx}.weight"], np.float32)
      if w.shape[0] != ch or w.shape[2:] != (3, 3):
        raise ValueError(f"features.{idx}.weight: shape {w.shape}, expected ({ch}, *, 3, 3)")
      net[f"features_{idx}"] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                                "bias": np.asarray(sd[f"features.{idx}.bias"], np.float32)}
  out = {"net": net}
  for name in ("alpha", "beta"):
    if name not in sd:
      raise ValueError(f"DISTS weights: no {name!r} in the state dict")
    v = np.asarray(sd[name], np.float32).reshape(-1)
    if v.shape != (sum(dists.CHANNELS),):
      raise ValueError(f"DISTS {name}: {v.size} values, expected {sum(dists.CHANNELS)}")
    out[name] = v
  return {"params": out}


_BN = {"bn_scale": "bn.weight", "bn_bias": "bn.bias", "bn_mean": "bn.running_mean",
       "bn_var": "bn.running_var"}


def inception_from_torch(sd: dict[str, np.ndarray]) -> dict:
  """Parameters from a pytorch-fid Inception state dict (``pt_inception-2015-12-05-*.pth``
  layout; ``fc.*`` and ``num_batches_tracked`` are not used). Returns ``{"params": ...}``."""
  abstract = inception.abstract_params()["params"]
  flat = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = [p.key for p in path]
    prefix = ".".join(names[:-1])
    leaf = names[-1]
    key = f"{prefix}.conv.weight" if leaf == "kernel" else f"{prefix}.{_BN[leaf]}"
    if key not in sd:
      raise ValueError(f"Inception state dict has no {key!r} (expected the pytorch-fid layout)")
    v = np.asarray(sd[key], np.float32)
    if leaf == "kernel":
      v = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    if v.shape != tuple(spec.shape):
      raise ValueError(f"{key}: shape {v.shape} (Flax layout), expected {tuple(spec.shape)}")
    flat[tuple(names)] = v
  return {"params": traverse_util.unflatten_dict(flat)}
