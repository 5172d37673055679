"""TPU slices as devices to compile for on any host: a topology name (``v5e:4x4``, ``v4:2x2x1``)
becomes the slice's devices through libtpu's compile-only client, and each chip generation's
published figures (HBM, bf16 peak, HBM bandwidth) feed the fit check and the roofline projection.

libtpu is imported only when a TPU topology is asked for; the CPU paths never load it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import sys


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip generation's published figures (per chip; v4 and v5p as one megacore device)."""

  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  megacore: bool  # two TensorCores presented as one device (chip_config_name="megacore")
  cloud_type: str  # the Cloud TPU accelerator-type prefix (TPU_TYPE of launch/tpu_vm.sh)
  cores_per_chip_in_type: int  # v4-8 counts TensorCores: 4 chips


GiB = 2 ** 30
# Google Cloud's TPU system-architecture pages: HBM per chip, peak bf16 FLOP/s, HBM bandwidth.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, True, "v4", 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, False, "v5litepod", 1),
    "v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, True, "v5p", 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, True, "v5p", 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, False, "v6e", 1),
}
HOST = "host"  # the devices of this process (any backend): compile for what is here
_NAME = re.compile(r"^(v4|v5e|v5p|v5|v6e):(\d+(?:x\d+){1,2})$")


_CLOUD = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")
# Slice shapes of the Cloud TPU accelerator types, by chip count (2D: v5e / v6e; 3D: v4 / v5p).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}


def from_cloud_type(accelerator_type: str) -> str:
  """A Cloud TPU accelerator type as a topology name (``v5litepod-16`` -> ``v5e:4x4``,
  ``v4-8`` -> ``v4:2x2x1``); names that are already topologies pass through."""
  m = _CLOUD.match(accelerator_type or "")
  if not m:
    return accelerator_type
  gen = {"v4": "v4", "v5litepod": "v5e", "v5p": "v5", "v6e": "v6e"}[m.group(1)]
  chip = CHIPS[gen]
  n = int(m.group(2)) // chip.cores_per_chip_in_type
  shapes = _SHAPES_3D if chip.megacore else _SHAPES_2D
  if n not in shapes:
    raise ValueError(f"--topology={accelerator_type!r}: no known slice shape for {n} chips")
  return f"{gen}:{shapes[n]}"


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
  """``'v5e:4x4'`` (or its Cloud type ``'v5litepod-16'``) -> (the chip, ``(4, 4)``); an
  unknown name is a ValueError naming the form."""
  m = _NAME.match(from_cloud_type(name or ""))
  if not m:
    raise ValueError(f"--topology={name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                     f"{', '.join(CHIPS)} (e.g. v5e:4x4, v4:2x2x1, v5:2x2x1, v6e:2x2), a Cloud "
                     f"TPU type (v5litepod-16, v4-8, ...) or {HOST!r}")
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if min(dims) < 1:
    raise ValueError(f"--topology={name!r}: every dimension must be at least 1")
  return CHIPS[m.group(1)], dims


def cloud_accelerator_type(name: str) -> str:
  """The Cloud TPU accelerator type of a topology (``v5e:4x4`` -> ``v5litepod-16``)."""
  chip, dims = parse(name)
  return f"{chip.cloud_type}-{math.prod(dims) * chip.cores_per_chip_in_type}"


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips sit on the PCI bus under Google's vendor id
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


def _tpu_chip_attached() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def keep_cpu_host_off_libtpu() -> None:
  """On a host with libtpu installed (``requirements-tpu.txt``, for the ahead-of-time compiles)
  but no TPU chip and no GPU, keep JAX on the CPU: otherwise its backend discovery loads libtpu,
  which looks for a TPU metadata server and logs warnings about the accelerator type and the
  worker hostnames at every command. An explicit ``JAX_PLATFORMS`` is left as it is, and
  :func:`devices` still builds any slice (libtpu's compile-only client needs no TPU backend)."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if _tpu_chip_attached() or any(os.path.exists(d) for d in _GPU_DEVICE_FILES):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported already: its config read the environment then
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _quiet_libtpu() -> None:
  # A CPU host has no TPU metadata server: without these libtpu logs warnings about the
  # accelerator type and worker hostnames at import (harmless for compile-only use).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # compile-only use: several processes (a search, the tests) may hold libtpu at once
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")


def devices(name: str) -> list:
  """The devices of slice ``name`` (compile-only on a host without TPUs), or this process's
  devices for ``'host'``."""
  import jax
  if name == HOST:
    return list(jax.devices())
  name = from_cloud_type(name)
  chip, dims = parse(name)
  _quiet_libtpu()
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
  if math.prod(dims) < 4:  # smaller than libtpu's default host (2x2x1 chips): one host
    kwargs["chips_per_host_bounds"] = tuple(min(d, b) for d, b in
                                            zip(dims + (1,) * (3 - len(dims)), (2, 2, 1)))
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # libtpu missing or a slice it does not know
    raise ValueError(f"--topology={name!r}: libtpu could not describe this slice ({e}); "
                     "install requirements-tpu.txt") from e
  return list(desc.devices)


def chip_of(devs) -> Chip | None:
  """The published figures for ``devs``' chip (None for CPUs, GPUs and unknown kinds)."""
  kind = devs[0].device_kind.lower()
  for key, chip in (("v5 lite", CHIPS["v5e"]), ("v5e", CHIPS["v5e"]), ("v6", CHIPS["v6e"]),
                    ("v5", CHIPS["v5p"]), ("v4", CHIPS["v4"])):
    if key in kind:
      return chip
  return None


def num_hosts(devs) -> int:
  return len({d.process_index for d in devs})
