"""What a compiled XLA program says about itself: per-device memory, whether it fits, the
collectives of the optimized program, and a roofline projection of its time from a chip's
published figures. Reads ``jax.stages.Compiled`` objects; compiles nothing itself.
"""

from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# XLA's TPU messages for a program over the chip's memory, e.g. "the total memory required for
# HLO temporaries (75.21G) exceeds available HBM (15.75G)" or "Used 16.10G of 15.75G hbm"
_OOM_FORMS = (
    re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM\s*"
               r"\(([\d.]+)([KMGT]?)\)", re.I),
    re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.I))
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES)
                    + r")(-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_BOUND_CONST = re.compile(r"[su]32\[\]\S*\s+constant\((\d+)\)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r"(?:to_apply|calls|body|condition|true_computation|false_computation)"
                     r"=%?([\w.\-]+)|(?:branch_computations|called_computations|calls)=\{([^}]*)\}")


def memory(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis; ``peak_bytes`` is what the device holds at
  once: arguments and outputs (less the donated buffers they share), temporaries and code."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes),
         "code_bytes": int(m.generated_code_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"] + out["code_bytes"])
  return out


def out_of_memory(error: BaseException) -> dict | None:
  """The bytes a program that did not fit wanted, from XLA's RESOURCE_EXHAUSTED message (None
  when ``error`` is something else)."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  m = next((m for m in (f.search(text) for f in _OOM_FORMS) if m), None)
  out = {"error": next((line.strip() for line in text.splitlines() if "memory" in line.lower()),
                       text.splitlines()[0] if text else "")[:400]}
  if m:
    out["wanted_bytes"] = int(float(m.group(1)) * _UNIT[m.group(2).upper()])
    out["limit_bytes"] = int(float(m.group(3)) * _UNIT[m.group(4).upper()])
  return out


def _shape_bytes(text: str) -> list[float]:
  """Bytes of each array in an HLO type, leaving out rank-0 arrays (an async collective's
  context words, e.g. the two ``u32[]`` of a ``collective-permute-start``)."""
  return [float(np.prod([int(d) for d in dims.split(",")])) * _DTYPE_BYTES[dt]
          for dt, dims in _ARRAY.findall(text) if dims]


def _computations(lines: list[str]) -> dict[str, list[str]]:
  """An HLO module's computations: name -> its instruction lines (headers sit at column 0)."""
  comps: dict[str, list[str]] = {}
  body = None
  for line in lines:
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      words = line.split()
      name = words[1] if words[0] == "ENTRY" else words[0]
      body = comps.setdefault(name.lstrip("%"), [])
    elif body is not None and line.strip() and line.strip() != "}":
      body.append(line)
  return comps


def _multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while loop's body runs its
  trip count, the one XLA records on the loop (``known_trip_count``, XLA:GPU) or else the integer
  bound its condition compares the counter with (the scanned layer stacks count from 0 to their
  depth, XLA's windowed collective matmuls from 0 to the number of shards); nested loops
  multiply."""
  trips, calls = {}, {}
  for name, body in comps.items():
    calls[name] = []
    for line in body:
      w = _WHILE.search(line)
      if w:
        known = _KNOWN_TRIPS.search(line)
        bounds = ([int(known.group(1))] if known else
                  [int(c) for c in _BOUND_CONST.findall("\n".join(comps.get(w.group(1), [])))])
        trips[w.group(2)] = max(bounds) if bounds else 1
      for one, many in _CALLED.findall(line):
        calls[name].extend(c.strip().lstrip("%") for c in (one or many).split(",") if c.strip())
  times: dict[str, int] = {}

  def visit(comp: str, k: int, depth: int = 0):
    if depth > 64 or times.get(comp, 0) >= k:
      return
    times[comp] = k
    for callee in calls.get(comp, ()):
      visit(callee, k * trips.get(callee, 1), depth + 1)

  called = {c for cs in calls.values() for c in cs}
  for root in (c for c in comps if c not in called):
    visit(root, 1)
  return times


def collectives(hlo_text: str) -> dict:
  """Collectives of an optimized HLO module by kind: ``instructions`` in the program text,
  ``count`` run per call (inside a loop body, times its trip count) and the ``bytes`` they
  produce per call on one device (an async ``-start``'s result, not its ``-done``)."""
  comps = _computations(hlo_text.splitlines())
  times = _multipliers(comps)
  out = {k: {"instructions": 0, "count": 0, "bytes": 0} for k in COLLECTIVES}
  for name, body in comps.items():
    k = times.get(name, 1)
    for line in body:
      m = _INSTR.match(line)
      if not m:
        continue
      shapes = _shape_bytes(m.group(1))
      # an async start returns (operands..., results...): the results are the second half
      nbytes = sum(shapes[len(shapes) // 2:]) if m.group(3) and len(shapes) > 1 else sum(shapes)
      entry = out[m.group(2)]
      entry["instructions"] += 1
      entry["count"] += k
      entry["bytes"] += int(nbytes * k)
  return out


def hlo_instructions(hlo_text: str) -> int:
  return sum(1 for line in hlo_text.splitlines() if " = " in line)


def roofline(*, flops_per_chip: float, model_flops_per_chip: float | None, mem: dict,
             chip) -> dict:
  """A projection, not a measurement: the program can be no faster than its FLOPs at the chip's
  bf16 peak nor than its least HBM traffic (arguments read once, outputs written once,
  temporaries written and read once) at the chip's bandwidth. MFU (the trainable model's FLOPs
  over that time at peak) is then an upper bound; collectives and overlap losses are not in it."""
  if chip is None:
    return {"projection": "none (no published figures for this device)"}
  least_bytes = mem["argument_bytes"] + mem["output_bytes"] + 2 * mem["temp_bytes"]
  compute_s = flops_per_chip / chip.peak_bf16_flops
  memory_s = least_bytes / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  out = {"projected_step_s": step_s, "projected_compute_s": compute_s,
         "projected_hbm_s": memory_s,
         "projected_bound": "compute" if compute_s >= memory_s else "memory"}
  if model_flops_per_chip is not None:
    out["projected_mfu"] = model_flops_per_chip / (step_s * chip.peak_bf16_flops)
  out.update(peak_bf16_flops_per_chip=chip.peak_bf16_flops, hbm_bytes_per_s=chip.hbm_bytes_per_s,
             projection="roofline from the chip's published bf16 peak and HBM bandwidth (an "
                        "upper bound on speed); not measured on the chip")
  return out
