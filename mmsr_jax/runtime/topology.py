"""Accelerators as devices to compile for on any host: a TPU topology name (``v5e:4x4``,
``v4:2x2x1``) becomes the slice's devices through libtpu's compile-only client, and a GPU name
(``h100:8``, ``h200:2x8``) becomes NVIDIA GPUs described to XLA's CUDA compiler without one
attached. Each chip's published figures (memory, bf16 peak, memory bandwidth) feed the fit check
and the roofline projection.

libtpu and the CUDA plugin are loaded only when such a topology is asked for; the CPU paths never
load them.
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
  gpu: bool = False

  def usable_bytes(self) -> int:
    """What a program may use: all of a TPU's HBM; on a GPU the share JAX's allocator takes at
    start (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 unless set in this environment)."""
    if not self.gpu:
      return self.hbm_bytes
    return int(self.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)))


GiB = 2 ** 30
# Google Cloud's TPU system-architecture pages: HBM per chip, peak bf16 FLOP/s, HBM bandwidth.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, True, "v4", 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, False, "v5litepod", 1),
    "v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, True, "v5p", 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, True, "v5p", 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, False, "v6e", 1),
}


@dataclasses.dataclass(frozen=True)
class GpuModel:
  """What XLA's CUDA compiler needs to know of a GPU it cannot see (its ``target_config``):
  NVIDIA's published figures for the SXM part."""

  chip: Chip
  description: str  # the device kind the target reports
  sms: int
  clock_ghz: float
  l2_bytes: int
  shared_per_sm: int
  shared_per_block_optin: int
  compute_capability: tuple[int, int]


MiB = 2 ** 20
# HBM as the driver reports it (nvidia-smi), dense bf16 tensor-core peak, HBM bandwidth.
GPUS = {
    "a100": GpuModel(Chip("a100", 81920 * MiB, 312e12, 2039e9, False, "", 1, gpu=True),
                     "NVIDIA A100-SXM4-80GB", 108, 1.41, 40 * MiB, 164 * 1024, 163 * 1024, (8, 0)),
    "h100": GpuModel(Chip("h100", 81559 * MiB, 989e12, 3350e9, False, "", 1, gpu=True),
                     "NVIDIA H100 80GB HBM3", 132, 1.98, 50 * MiB, 228 * 1024, 227 * 1024, (9, 0)),
    "h200": GpuModel(Chip("h200", 143771 * MiB, 989e12, 4800e9, False, "", 1, gpu=True),
                     "NVIDIA H200", 132, 1.98, 50 * MiB, 228 * 1024, 227 * 1024, (9, 0)),
}
_GPU_NAME = re.compile(r"^(a100|h100|h200):(?:(\d+)x)?(\d+)$")
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
  """``'v5e:4x4'`` (or its Cloud type ``'v5litepod-16'``) -> (the chip, ``(4, 4)``);
  ``'h100:2x8'`` -> (the GPU, ``(hosts, GPUs per host)``); an unknown name is a ValueError naming
  the forms."""
  g = _GPU_NAME.match(name or "")
  if g:
    hosts, per_host = int(g.group(2) or 1), int(g.group(3))
    if min(hosts, per_host) < 1:
      raise ValueError(f"--topology={name!r}: hosts and GPUs per host must be at least 1")
    return GPUS[g.group(1)].chip, (hosts, per_host)
  m = _NAME.match(from_cloud_type(name or ""))
  if not m:
    raise ValueError(f"--topology={name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                     f"{', '.join(CHIPS)} (e.g. v5e:4x4, v4:2x2x1, v5:2x2x1, v6e:2x2), a Cloud "
                     f"TPU type (v5litepod-16, v4-8, ...), GPU:[HOSTSx]N with GPU one of "
                     f"{', '.join(GPUS)} (e.g. h100:8, h200:2x8) or {HOST!r}")
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


def _gpu_attached() -> bool:
  return any(os.path.exists(d) for d in _GPU_DEVICE_FILES)


def _tpu_chip_attached() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def _cuda_plugin() -> str | None:
  for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
    try:
      if importlib.util.find_spec(name) is not None:
        return name
    except ModuleNotFoundError:  # no jax_plugins namespace at all
      return None
  return None


def keep_accelerator_less_host_on_cpu() -> None:
  """On a host with libtpu or JAX's CUDA plugin installed (for the ahead-of-time compiles) but
  no TPU chip and no GPU, keep JAX on the CPU: otherwise its backend discovery loads libtpu, which
  looks for a TPU metadata server and logs warnings at every command, or fails to start CUDA and
  logs a traceback. An explicit ``JAX_PLATFORMS`` is left as it is, and :func:`devices` still
  builds any slice or GPU set (both compilers run without a backend of their kind)."""
  if "JAX_PLATFORMS" in os.environ:
    return
  if importlib.util.find_spec("libtpu") is None and _cuda_plugin() is None:
    return
  if _tpu_chip_attached() or _gpu_attached():
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


def _package_version(names, default: tuple[int, int]) -> tuple[int, int]:
  from importlib import metadata
  for n in names:
    try:
      major, minor = metadata.version(n).split(".")[:2]
      return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
      continue
  return default


def gpu_target_config(model: GpuModel) -> str:
  """XLA's ``GpuTargetConfigProto`` (text) for ``model``, with the cuDNN and CUDA runtime
  versions of the installed CUDA wheels (the kernels XLA picks depend on them)."""
  cuda = "cu13" if _cuda_plugin() == "jax_plugins.xla_cuda13" else "cu12"
  dnn = _package_version([f"nvidia-cudnn-{cuda}"], (9, 8))
  runtime = _package_version([f"nvidia-cuda-runtime-{cuda}", "nvidia-cuda-runtime"],
                             (13, 0) if cuda == "cu13" else (12, 8))
  info = {
      "threads_per_block_limit": 1024, "threads_per_warp": 32,
      "shared_memory_per_block": 48 * 1024, "shared_memory_per_core": model.shared_per_sm,
      "threads_per_core_limit": 2048, "core_count": model.sms, "fpus_per_core": 128,
      "block_dim_limit_x": 2 ** 31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
      "memory_bandwidth": int(model.chip.hbm_bytes_per_s), "l2_cache_size": model.l2_bytes,
      "clock_rate_ghz": model.clock_ghz, "device_memory_size": model.chip.hbm_bytes,
      "shared_memory_per_block_optin": model.shared_per_block_optin,
      "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
  fields = " ".join(f"{k}: {v}" for k, v in info.items())
  cc = model.compute_capability
  return (f"gpu_device_info {{ {fields} "
          f"cuda_compute_capability {{ major: {cc[0]} minor: {cc[1]} }} }} "
          f'platform_name: "CUDA" dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }} '
          f"runtime_version {{ major: {runtime[0]} minor: {runtime[1]} }} "
          f'device_description_str: "{model.description}"')


def _gpu_devices(name: str) -> list:
  chip, (hosts, per_host) = parse(name)
  if _cuda_plugin() is None:
    raise ValueError(f"--topology={name!r}: describing GPUs needs JAX's CUDA plugin; install "
                     "requirements-gpu.txt")
  from jax.experimental import topologies
  model = GPUS[chip.name]
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(model),
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # a plugin without deviceless topologies, or one that failed to load
    raise ValueError(f"--topology={name!r}: the CUDA plugin could not describe these GPUs "
                     f"({e})") from e
  return list(desc.devices)


def compiler_options(devs) -> dict:
  """XLA options a compile for ``devs`` needs on this host. GPUs described without one attached
  (:func:`devices`) take cuBLAS for every matmul: XLA's Triton GEMM fusions pick their tiles by
  autotuning on the device, and without one some fail to tile. A run on the GPUs may fuse some
  matmuls with Triton instead, so its temporaries may differ a little from this compile's."""
  if devs and devs[0].platform == "gpu" and not _gpu_attached():
    return {"xla_gpu_enable_triton_gemm": False}
  return {}


def devices(name: str) -> list:
  """The devices of slice ``name`` (compile-only on a host without TPUs or GPUs), or this
  process's devices for ``'host'``."""
  import jax
  if name == HOST:
    return list(jax.devices())
  if _GPU_NAME.match(name):
    return _gpu_devices(name)
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
  """The published figures for ``devs``' chip (None for CPUs and unknown kinds)."""
  kind = devs[0].device_kind.lower()
  for key, chip in (("h200", GPUS["h200"].chip), ("h100", GPUS["h100"].chip),
                    ("a100", GPUS["a100"].chip),
                    ("v5 lite", CHIPS["v5e"]), ("v5e", CHIPS["v5e"]), ("v6", CHIPS["v6e"]),
                    ("v5", CHIPS["v5p"]), ("v4", CHIPS["v4"])):
    if key in kind:
      return chip
  return None


def num_hosts(devs) -> int:
  return len({d.process_index for d in devs})
