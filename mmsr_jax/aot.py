r"""Compiles a config's train step or sampler ahead of time for a TPU slice or a set of NVIDIA
GPUs (or this host), with neither attached and no weights, and reports whether it fits and what
it costs per chip.

  python -m mmsr_jax.aot --config=configs/dit_l.py --topology=v5e:4x4
  python -m mmsr_jax.aot --config=configs/dit_l.py --topology=v5e:4x4 --search_batch
  python -m mmsr_jax.aot --config=configs/dit_xl.py --topology=v5:2x2x1 --program=sample
  python -m mmsr_jax.aot --config=configs/dit_l.py --topology=v5e:4x4 \
      --save_executable=gs://BUCKET/aot/dit_l_v5e_4x4.exe   # training loads it
      # (--config.compiled_step=PATH) and skips its compile

Topologies: GENERATION:AxB[xC] with v4, v5e, v5 / v5p, v6e (libtpu describes the slice;
install requirements-tpu.txt), GPU:[HOSTSx]N with a100, h100, h200 (JAX's CUDA plugin describes
them; install requirements-gpu.txt), or ``host`` for this process's devices. Figures per chip;
the roofline step time and MFU are projections from the chip's published peak and bandwidth.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from mmsr_jax import cli

_F = flags.FLAGS


def define_flags() -> None:
  from mmsr_jax import programs
  config_flags.DEFINE_config_file(
      "config", "configs/tiny.py", "Config file (ml_collections); override fields with "
      "--config.field=value.", lock_config=False)
  flags.DEFINE_string("topology", None, "The slice to compile for, e.g. v5e:4x4, v4:2x2x1, "
                      "v5:2x2x1, v6e:2x2, v5e:16x16; GPUs: h100:8 (one host of 8), h200:2x8; "
                      "'host' = this process's devices.")
  flags.DEFINE_enum("program", "train", list(programs.PROGRAMS), "The train step or the sampler.")
  flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
  flags.DEFINE_bool("search_batch", False, "Find the largest per-chip batch that fits by "
                    "compile bisection (train: the step; sample: images per chip).")
  flags.DEFINE_integer("search_limit", 256, "Largest per-chip batch the search tries.",
                       lower_bound=1)
  flags.DEFINE_integer("search_step", None, "The search tries only multiples of this (train: "
                       "default the config's encode_passes, which a per-chip batch should be a "
                       "multiple of; sample: 1).", lower_bound=1)
  flags.DEFINE_integer("per_chip_batch", None, "Per-chip batch (train: default the config's "
                       "batch_size / chips; sample: default 1).", lower_bound=1)
  flags.DEFINE_integer("sample_size", 512, "Sampler output side in pixels.", lower_bound=1)
  flags.DEFINE_integer("sample_steps", 50, "DDIM steps.", lower_bound=1)
  flags.DEFINE_enum("sample_guidance", "mcfg", ["cfg", "m0cfg", "mcfg", "none"],
                    "Guidance mode ('none': conditional branch only).")
  flags.DEFINE_integer("sample_large", 2048, "Also compile one tiled output of this side on one "
                       "chip (0: skip).", lower_bound=0)
  flags.DEFINE_integer("sample_tile_batch", 16, "Tiled output: most tiles x branches per "
                       "denoiser pass (0: all at once).", lower_bound=0)
  flags.DEFINE_integer("sample_map_batch", 4, "Tiled output: most tiles VQ-encoded at once "
                       "(0: all).", lower_bound=0)
  flags.DEFINE_string("save_executable", None, "Write the compiled train step here (and its key "
                      "to PATH.json) for training on this topology to load.")
  flags.DEFINE_enum("count_flops", "xla", ["xla", "model"], "Train step FLOPs for the roofline: "
                    "XLA's count of an unrolled copy compiled for this host's CPU (one more "
                    "compile, minutes for the research configs) or the project's model count.")
  flags.DEFINE_string("hlo", None, "Also write the optimized HLO text of the (first) compiled "
                      "program here, to read its collectives and fusions.")
  flags.DEFINE_bool("require_fit", False, "Exit with status 2 and one error line when the "
                    "program does not fit (launch/tpu_vm.sh create checks with it).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --json / --save_executable file.")


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _print(report: dict, indent: str = "") -> None:
  for k, v in report.items():
    if isinstance(v, dict) and k == "collectives":
      shown = ", ".join(f"{kind} {c['count']} ({_gib(c['bytes'])})" for kind, c in v.items()
                        if c["count"])
      print(f"{indent}{k}: {shown or 'none'}")
    elif isinstance(v, dict):
      print(f"{indent}{k}:")
      _print(v, indent + "  ")
    elif isinstance(v, list):
      print(f"{indent}{k}:")
      for i, item in enumerate(v):
        print(f"{indent}  [{i}]")
        _print(item, indent + "    ") if isinstance(item, dict) else print(f"{indent}    {item}")
    elif k.endswith("_bytes") and isinstance(v, int):
      print(f"{indent}{k}: {v} ({_gib(v)})")
    else:
      print(f"{indent}{k}: {v}")


def main(argv) -> None:
  del argv
  from mmsr_jax import programs
  from mmsr_jax.schema import sr as sr_schema
  from mmsr_jax.runtime import executable, topology
  if not _F.topology:
    raise ValueError("--topology is required, e.g. --topology=v5e:4x4 (or 'host')")
  if _F.topology != topology.HOST:
    topology.parse(_F.topology)  # a bad name is one line before anything is built
  outputs = [p for p in (_F.json, _F.save_executable, _F.hlo) if p]
  if _F.save_executable:
    outputs.append(_F.save_executable + executable.KEY_SUFFIX)
    if _F.program != "train":
      raise ValueError("--save_executable writes the train step: use it with --program=train")
  cli.refuse_existing(outputs, _F.overwrite)
  for p in outputs:
    cli.check_writable(os.path.dirname(os.path.abspath(p)), "--json" if p == _F.json
                       else "--hlo" if p == _F.hlo else "--save_executable")
  config = _F.config
  sr_schema.validate(config)
  devices = topology.devices(_F.topology)
  n = len(devices)
  print(f"{_F.program} program of {config_flags.get_config_filename(_F['config'])} for {_F.topology}: {n} chips, {topology.num_hosts(devices)} hosts, "
        f"{devices[0].device_kind}")

  if _F.program == "train":
    if _F.per_chip_batch is None and config.batch_size % n:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                       f"{n} chips of {_F.topology}; set --per_chip_batch")
    default_batch = _F.per_chip_batch or config.batch_size // n

    def one(b: int):
      rep, comp, low = programs.compile_report(
          "train", lambda: programs.train_program(config, devices, b), devices,
          flops_per_chip=programs.train_flops(devices, xla=_F.count_flops == "xla"))
      rep["per_chip_batch"] = b
      print(f"  per-chip batch {b}: fits {rep['fits']}, peak "
            f"{_gib(rep.get('peak_bytes', rep.get('wanted_bytes')))}, compile "
            f"{rep['compile_s']:.0f} s", flush=True)
      return rep, comp, low
  else:
    default_batch = _F.per_chip_batch or 1

    def one(b: int):
      rep, comp, low = programs.compile_report(
          "sample", lambda: programs.sample_program(
              config, devices, per_chip_batch=b, size=_F.sample_size, steps=_F.sample_steps,
              guidance=_F.sample_guidance), devices,
          flops_per_chip=programs.sample_flops(devices, b, _F.sample_steps,
                                               _F.sample_guidance != "none"))
      rep.update(per_chip_batch=b, output=f"{_F.sample_size}x{_F.sample_size}",
                 steps=_F.sample_steps, guidance=_F.sample_guidance)
      print(f"  {b} image(s) per chip: fits {rep['fits']}, peak "
            f"{_gib(rep.get('peak_bytes', rep.get('wanted_bytes')))}, compile "
            f"{rep['compile_s']:.0f} s", flush=True)
      return rep, comp, low

  report, compiled, lowered = one(default_batch)
  if _F.hlo and compiled is not None:
    with open(_F.hlo, "w") as f:
      f.write(compiled.as_text())
  result = {"topology": _F.topology, **report}
  if _F.search_batch:
    best, tried = programs.search_batch(
        lambda b: report if b == default_batch else one(b)[0], start=default_batch,
        limit=_F.search_limit, step=_F.search_step or (
            config.get("encode_passes", 1) if _F.program == "train" else 1))
    result["largest_per_chip_batch"] = best
    result["search"] = [{k: r.get(k) for k in ("per_chip_batch", "fits", "peak_bytes",
                                               "wanted_bytes", "compile_s")} for r in tried]
  if _F.program == "sample" and _F.sample_large:
    large = programs.compile_report(
        "sample", lambda: programs.sample_program(
            config, devices[:1], size=_F.sample_large, steps=_F.sample_steps,
            guidance=_F.sample_guidance, tile_batch=_F.sample_tile_batch or None,
            map_batch=_F.sample_map_batch or None), devices[:1])[0]
    result["large_output"] = {"output": f"{_F.sample_large}x{_F.sample_large}", "chips": 1,
                              **{k: large.get(k) for k in (
                                  "fits", "peak_bytes", "wanted_bytes", "temp_bytes",
                                  "argument_bytes", "compile_s", "advice")
                                 if large.get(k) is not None}}
  if _F.save_executable:
    if compiled is None:
      raise ValueError(f"the train step does not fit {_F.topology}: nothing to save "
                       f"({report.get('advice', '')})")
    key = executable.save(_F.save_executable, compiled, lowered, devices,
                          description={"topology": _F.topology})
    result["executable"] = {"path": _F.save_executable, "bytes": key["payload_bytes"]}
  _print(result)
  if _F.json:
    with open(_F.json, "w") as f:
      json.dump(result, f, indent=1)
  if _F.require_fit and not result["fits"]:
    wanted = result.get("wanted_bytes", result.get("peak_bytes"))
    raise ValueError(f"{config_flags.get_config_filename(_F['config'])} does not fit "
                     f"{_F.topology}: {_F.program} wants {_gib(wanted)} per chip of "
                     f"{_gib(result.get('limit_bytes') or result.get('hbm_bytes'))}; "
                     f"{result.get('advice', '')}")


if __name__ == "__main__":
  cli.run(main, define_flags)
