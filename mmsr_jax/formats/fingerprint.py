"""Fingerprints of the frozen encoders' weights, written with precomputed features and checked
before training reads them, so features of one encoder are never trained against another."""

from __future__ import annotations

import hashlib
import json
import os

from mmsr_jax.formats.param_layout import params_file

# Frozen part -> the config field holding its weights ("" = a deterministic random init).
FROZEN_FIELDS = {"ae": "autoencoder.params", "text": "text.params", "vq": "vq.params"}
FULL_HASH_BYTES = 1 << 30  # files up to this size are hashed whole
SAMPLES = 64  # larger ones (T5-XXL: 19 GB): size, header and this many evenly spaced MiB


def frozen_path(config, part: str) -> str:
  """The weights path of frozen part ``part`` (``ae``, ``text``, ``vq``); "" = random init (and
  always for the parameter-free pixel autoencoder)."""
  if part == "ae" and config.autoencoder.kind != "vae":
    return ""
  node = config
  for name in FROZEN_FIELDS[part].split("."):
    node = node[name]
  return node


def weights_fingerprint(path: str) -> str:
  """sha256 of a weights file; for a file over ``FULL_HASH_BYTES``, of its size, its first MiB
  (the safetensors header) and ``SAMPLES`` evenly spaced MiB (any other model differs there)."""
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= FULL_HASH_BYTES:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
      return h.hexdigest()
    h.update(str(size).encode())
    for k in range(SAMPLES + 1):
      f.seek(k * (size - (1 << 20)) // SAMPLES)
      h.update(f.read(1 << 20))
  return "sampled:" + h.hexdigest()


def _section(config, part: str) -> dict:
  if part == "ae":
    ae = config.autoencoder
    return {"kind": ae.kind, "factor": ae.factor, "scaling_factor": ae.scaling_factor,
            "shift_factor": ae.get("shift_factor", 0.0), "arch": ae.arch.to_dict()}
  if part == "text":
    return config.text.encoder.to_dict()
  return {"arch": config.vq.arch.to_dict(), "per_modality": bool(config.vq.per_modality)}


def encoder_fingerprint(config, part: str) -> str:
  """The fingerprint of frozen part ``part`` (``ae``, ``text``, ``vq``) as ``config`` builds it:
  its weights file's, or for a random initialisation one of the architecture and seed."""
  path = frozen_path(config, part)
  if path:
    return weights_fingerprint(params_file(path))
  spec = json.dumps({"part": part, "seed": int(config.seed), "arch": _section(config, part)},
                    sort_keys=True, default=str)
  return "random:" + hashlib.sha256(spec.encode()).hexdigest()
