"""Fields every training task has (run length, logging, mesh, optimizer) and their checks."""

from __future__ import annotations

import math

import ml_collections

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
LR_DECAYS = ("cosine", "constant")


def common_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16  # global batch, split over all devices
  c.num_train_steps = 1000
  c.log_every = 25
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.compute_dtype = "float32"  # "bfloat16" on accelerators; master weights stay float32

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1: the devices the other axes leave
  c.mesh.fsdp = 1  # batch *and* parameters / optimizer / EMA split over it
  c.mesh.tensor = 1  # heads / mlp dims split over it; the batch is replicated along it

  c.tensorboard = True
  c.sample_every = 0  # steps between logged sample grids (0 = only the final report)
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10
  c.profile.num_steps = 0  # 0 = no profiler trace
  c.peak_flops = 0.0  # per device, for MFU where mmsr_jax.training.flops does not know it

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.decay = "cosine"
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip = 1.0
  c.optimizer.ema_decay = 0.9999

  c.data = ml_collections.ConfigDict()
  c.data.map_size = 256  # side of the modality maps the VQ tokenizer sees
  c.data.num_workers = 0  # Grain worker processes
  return c


class Checker:
  """Raises one ``ValueError`` naming the first field that breaks a rule."""

  def __init__(self, config):
    self.config = config

  def get(self, path: str):
    node = self.config
    for part in path.split("."):
      node = node[part]
    return node

  def fail(self, path: str, expected: str):
    raise ValueError(f"config.{path}={self.get(path)!r}: expected {expected}")

  def choice(self, path: str, options) -> None:
    if self.get(path) not in options:
      self.fail(path, f"one of {tuple(options)}")

  def integer(self, path: str, lo: int, hi: int | None = None) -> None:
    v = self.get(path)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
      self.fail(path, f"an integer >= {lo}" + ("" if hi is None else f" and <= {hi}"))

  def number(self, path: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
             hi_open: bool = False) -> None:
    v = self.get(path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
      ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      if hi == math.inf:
        self.fail(path, f"a number {'>' if lo_open else '>='} {lo:g}")
      lo_s, hi_s = ("(" if lo_open else "[") + f"{lo:g}", f"{hi:g}" + (")" if hi_open else "]")
      self.fail(path, f"a number in {lo_s}, {hi_s}")

  def divides(self, path: str, value: int, what: str) -> None:
    if self.get(path) % value:
      self.fail(path, f"a multiple of {value} ({what})")


def validate_common(config) -> Checker:
  """Checks the shared fields; returns the checker for the task's own rules."""
  ck = Checker(config)
  ck.integer("seed", 0)
  ck.integer("batch_size", 1)
  ck.integer("num_train_steps", 1)
  ck.integer("log_every", 1)
  ck.integer("checkpoint_every", 1)
  ck.integer("keep_checkpoints", 1)
  ck.choice("compute_dtype", COMPUTE_DTYPES)
  sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
      ck.fail(f"mesh.{axis}", "a positive size or -1 (the devices the other axes leave)")
  if sum(s == -1 for s in sizes.values()) > 1:
    raise ValueError("config.mesh: only one axis may be -1 (fill)")
  ck.integer("sample_every", 0)
  ck.integer("profile.start_step", 0)
  ck.integer("profile.num_steps", 0)
  ck.number("peak_flops", 0.0)
  ck.number("optimizer.lr", 0.0, lo_open=True)
  ck.integer("optimizer.warmup_steps", 0)
  ck.choice("optimizer.decay", LR_DECAYS)
  ck.number("optimizer.final_lr_fraction", 0.0, 1.0)
  ck.number("optimizer.weight_decay", 0.0)
  ck.number("optimizer.b1", 0.0, 1.0, hi_open=True)
  ck.number("optimizer.b2", 0.0, 1.0, hi_open=True)
  ck.number("optimizer.grad_clip", 0.0)
  ck.number("optimizer.ema_decay", 0.0, 1.0)
  ck.integer("data.map_size", 1)
  ck.integer("data.num_workers", 0)
  return ck


def check_conv_arch(ck: Checker, prefix: str) -> None:
  """The fields of a convolutional autoencoder architecture (VQGAN, KL VAE) at ``prefix``."""
  for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
               "norm_num_groups"):
    ck.integer(f"{prefix}.{name}", 1)
  groups = ck.get(f"{prefix}.norm_num_groups")
  blocks = ck.get(f"{prefix}.block_out_channels")
  if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 or b % groups
                       for b in blocks):
    ck.fail(f"{prefix}.block_out_channels", "positive channel counts, each a multiple of "
            f"{prefix}.norm_num_groups={groups}")
