r"""Benchmarks: ``python -m mmsr_jax.bench NAME [--json] [--config=...] [flags]``; each lives in
a module of ``mmsr_jax/benches/`` (``BENCHES`` maps the names; a module is named for what it
times, apart from the commands it measures). Compare ratios from one run; absolute times only mean something on
an accelerator.

A benchmark module defines its own flags in ``define_flags()`` (called only for the benchmark named
on the command line, so importing a module defines nothing; flag names are global, hence
``--sample_steps``), reads them from ``flags.FLAGS`` in ``run() -> dict``, and returns the result
as flat key-value pairs. The flags every benchmark shares (``--config``, ``--json``, ``--repeats``,
``--warmup``) are defined once in ``benches/common.py``.
"""

from __future__ import annotations

import importlib
import json
import sys

from mmsr_jax.benches.common import JSON, device_description

# name -> module under mmsr_jax.benches
BENCHES = {
    "dit-forward": "dit_forward",  # our DiT vs diffusers PixArt, same weights and input
    "vae-tiled": "vae_tiled",  # tiled VAE decode at 2048x2048: time and peak memory
    "data": "data",  # host input pipeline throughput
    "prepare": "prepare",  # annotate / precompute pipelines: Beam workers vs the loop
    "sample": "sampling_speed",  # images/s of the sampler
    "train": "train_speed",  # step time, images/s, MFU
    "evaluate": "metric_speed",  # PSNR + SSIM + NIQE on two folders of pairs (or synthetic ones)
    "suite": "suite",  # the accelerator check: train MFU, cuDNN attention, sampling, one JSON
}


def _module(name: str):
  return importlib.import_module(f"mmsr_jax.benches.{BENCHES[name]}")


def _print(result: dict) -> None:
  if JSON.value:
    print(json.dumps(result, sort_keys=True))
    return
  for k, v in result.items():
    print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")


def main(argv) -> None:
  from mmsr_jax import cli  # noqa: F401 (imported for its error handling in run())
  if len(argv) != 2 or argv[1] not in BENCHES:
    raise ValueError(f"usage: python -m mmsr_jax.bench NAME [flags]; NAME is one of "
                     f"{', '.join(BENCHES)} (got {' '.join(argv[1:]) or 'nothing'})")
  result = {"benchmark": argv[1]}
  result.update(_module(argv[1]).run())
  result.setdefault("device", device_description())
  _print(result)


def define_flags() -> None:
  """Each benchmark's own flags; its module is imported only when it exists."""
  wanted = [a for a in sys.argv[1:] if not a.startswith("-")]
  for name in BENCHES:
    if wanted and wanted[0] != name:
      continue  # only the chosen benchmark's flags (and imports)
    try:
      mod = _module(name)
    except ModuleNotFoundError as e:
      if e.name == f"mmsr_jax.benches.{BENCHES[name]}":
        continue  # not written yet
      raise
    if hasattr(mod, "define_flags"):
      mod.define_flags()


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
