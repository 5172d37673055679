"""``bench sample``: images/s of the whole jitted sampler (512 px, 50 DDIM steps, m-CFG by default;
the text encoder's states are an input, as sampling with T5-XXL on the host runs it), and the
memory of a tiled 2048 px output.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags

from mmsr_jax.benches import common
from mmsr_jax.diffusion import sampler
from mmsr_jax.inference import text_device
from mmsr_jax.models import build
from mmsr_jax.runtime import sharding
from mmsr_jax.system import System


def define_flags() -> None:
  flags.DEFINE_integer("sample_size", 512, "Output side in pixels for images/s.")
  flags.DEFINE_integer("sample_batch", 0, "Images per call; 0 = as large as fits "
                       "(accelerators) or 1 (CPU).")
  flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
  flags.DEFINE_enum("sample_guidance", "mcfg", ["cfg", "m0cfg", "mcfg", "none"],
                    "Guidance mode ('none': conditional branch only).")
  flags.DEFINE_integer("sample_large", 2048, "Output side for the tiled memory figure "
                       "(0: skip).")
  flags.DEFINE_bool("sample_large_execute", None, "Run the large output too "
                    "(default: on GPU/TPU).")
  flags.DEFINE_bool("sample_time", True, "Run and time the sampler; false: compile only "
                    "and report XLA's memory analysis (e.g. the full model on a CPU).")
  flags.DEFINE_integer(
      "sample_large_tile_batch", 16, "Large output: most tiles x branches per denoiser pass "
      "(0: all at once).")
  flags.DEFINE_integer(
      "sample_large_map_batch", 4, "Large output: most tiles whose maps are VQ-encoded at once "
      "(0: all).")
  flags.DEFINE_integer("sample_max_batch", 256, "Upper bound of the batch search.")


def _bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _frozen_config(config):
  """Frozen-weight paths that do not exist are replaced by a random init (noted in the result)."""
  missing = []
  for field in ("autoencoder", "vq"):
    path = config[field].get("params", "")
    if path and not os.path.exists(path):
      missing.append(f"config.{field}.params={path}")
      config[field].params = ""
  config.text.params = ""  # the text encoder is not part of the timed program
  return missing


class _Setup:
  """The config's system with random denoiser weights and its frozen encoders (no T5)."""

  def __init__(self, config):
    devices = jax.devices()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = len(devices), 1, 1  # data parallel
    config.batch_size = len(devices)  # (only checked by make_mesh; the bench has its own batch)
    self.config = config
    self.system = system = System.from_config(config, devices)
    repl = sharding.replicated(system.mesh)
    self.params = jax.jit(lambda r: system.init_fn(r).params, out_shardings=repl)(
        jax.random.key(0))
    self.frozen = jax.device_put({**system.frozen_params(("ae", "vq")), "text": {}}, repl)

  def sample_fn(self, size: int, steps: int, guidance: str, tile_batch: int = 0,
                map_batch: int = 0):
    s = self.config.data.scale
    if size % (s * self.config.autoencoder.factor):
      raise ValueError(f"output size {size} is not a multiple of scale x autoencoder factor")
    grid = sampler.make_grid(self.config, (size // s, size // s))
    sy = self.system
    fn = sampler.make_sample_fn(
        sy.model, sy.conditioner, sy.schedule, grid, steps=steps, guidance=guidance,
        spacing=self.config.sampling.spacing, clip_x0=self.config.sampling.clip_x0,
        strength=1.0, mesh=sy.mesh, tile_batch=tile_batch or None, map_batch=map_batch or None)
    return fn, grid

  def inputs(self, batch: int, size: int, grid, guided: bool) -> dict:
    c = self.config
    lr_side = size // c.data.scale
    n = grid.num_tiles
    rng = np.random.default_rng(0)
    m, l, d = c.data.map_size, c.text.max_length, c.text.encoder.d_model
    rows = 2 * batch if guided else batch
    return {
        "lr": rng.uniform(-1, 1, (batch, lr_side, lr_side, 3)).astype(np.float32),
        "maps": rng.uniform(-1, 1, (batch * n, 3, m, m, 3)).astype(np.float32),
        "present": np.ones((batch * n, 3), bool),
        "temperature": np.ones((batch, 4), np.float32),
        "states": rng.standard_normal((rows, l, d)).astype(np.float32),
        "states_mask": np.ones((rows, l), np.int32),
    }


def _text_encoder(config) -> dict:
  """How the memory figures treat the text encoder, and its size (from shapes only)."""
  n = text_device.text_param_bytes(build.conditioner(config))
  where = ("on the host CPU (config.sampling.text_device=auto or cpu), so sampling needs no "
           "accelerator memory for it" if n > text_device.AUTO_HOST_TEXT_BYTES else
           "on the accelerator with text_device=auto (small), on the host with text_device=cpu")
  note = (f"excluded from every memory figure (its states are an input); python -m "
          f"mmsr_jax.sample keeps its {n / 2 ** 30:.2f} GiB of weights {where}")
  return {"text_encoder": note, "text_encoder_bytes": n}


def _describe(config) -> str:
  return (f"DiT width {config.model.width} x depth {config.model.depth}, {config.compute_dtype}, "
          f"autoencoder {config.autoencoder.kind} {list(config.autoencoder.arch.block_out_channels)}"
          f", VQ {list(config.vq.arch.block_out_channels)}")


def measure(config, *, size: int = 512, steps: int = 50, guidance: str = "mcfg",
            batch: int = 0, large: int = 2048, large_tile_batch: int = 16,
            large_map_batch: int = 4, large_execute: bool | None = None, timed: bool = True,
            max_batch: int = 256, repeats: int | None = None) -> dict:
  """Times the sampler on a batch of ``size`` px outputs and measures a tiled ``large`` px one.

  Every program is compiled once and the compiled object is what runs. ``batch=0`` takes the
  largest power of two (times the device count) that XLA's memory analysis of one compiled
  batch-of-``devices`` program says fits in 90% of the device's memory (1 on a CPU)."""
  missing = _frozen_config(config)
  st = _Setup(config)
  guided = guidance != "none"
  fn, grid = st.sample_fn(size, steps, guidance)
  on_cpu = jax.devices()[0].platform == "cpu"
  shards = len(jax.devices())

  def args(b):
    return (st.params, st.frozen, st.inputs(b, size, grid, guided), jax.random.key(0), 2.0, 0.0)

  compiled = {}

  def compile_for(b):
    if b not in compiled:
      compiled[b] = fn.lower(*args(b)).compile()
    return compiled[b]

  if batch <= 0:
    batch = 1
    limit = None if on_cpu else (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
      m = compile_for(shards).memory_analysis()
      weights = int(m.argument_size_in_bytes) - sum(
          int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(args(shards)[2]))
      per_image = (int(m.argument_size_in_bytes) - weights + int(m.output_size_in_bytes)
                   + int(m.temp_size_in_bytes)) / shards
      batch = shards
      while 2 * batch <= max_batch and weights + 2 * batch * per_image <= 0.9 * limit:
        batch *= 2
  # The large output runs first, so the device's peak counter then measures it alone.
  out_large = {}
  if large:
    big_fn, big_grid = st.sample_fn(large, steps, guidance, large_tile_batch, large_map_batch)
    big_args = (st.params, st.frozen, st.inputs(1, large, big_grid, guided), jax.random.key(0),
                2.0, 0.0)
    big = big_fn.lower(*big_args).compile()
    out_large = {"large_output": f"{large}x{large}", "large_tiles": big_grid.num_tiles,
                 "large_tile_batch": large_tile_batch, "large_map_batch": large_map_batch,
                 "large_xla_bytes": _bytes(big)}
    if (not on_cpu) if large_execute is None else large_execute:
      out_large["large_seconds"] = common.time_call(
          lambda: big(*big_args).block_until_ready(), repeats=1, warmup=1)
      big_peak = common.peak_device_memory()
      out_large["large_peak_memory_bytes"] = (big_peak if big_peak is not None
                                              else common.host_peak_rss())
  result = {"config": _describe(config), "output": f"{size}x{size}", "steps": steps,
            "guidance": guidance, "batch": batch, "tiles_per_image": grid.num_tiles,
            **_text_encoder(config), "random_weights_for": missing or "denoiser only"}
  program = compile_for(batch)
  result["program_xla_bytes"] = _bytes(program)
  if timed:
    a = args(batch)
    call = lambda: program(*a).block_until_ready()  # noqa: E731
    seconds = common.time_call(call, repeats)
    out = call()
    assert out.shape == (batch, size, size, 3), out.shape
    assert np.isfinite(np.asarray(out)).all()
    peak = common.peak_device_memory()
    result.update(seconds_per_batch=seconds, images_per_s=batch / seconds,
                  peak_memory_bytes=peak if peak is not None else result["program_xla_bytes"],
                  peak_memory_source=("device peak" if peak is not None
                                      else "XLA memory analysis of the compiled program"),
                  host_peak_rss_bytes=common.host_peak_rss())
  result["timed"] = timed
  result["programs_compiled"] = len(compiled) + bool(large)
  result.update(out_large)
  return result


def run() -> dict:
  F = flags.FLAGS
  config = common.CONFIG.value
  if config is None:
    raise ValueError("bench sample needs --config (e.g. --config=configs/dit_l.py)")
  return measure(config, size=F.sample_size, steps=F.sample_steps, guidance=F.sample_guidance,
                 batch=F.sample_batch, large=F.sample_large,
                 large_tile_batch=F.sample_large_tile_batch,
                 large_map_batch=F.sample_large_map_batch,
                 large_execute=F.sample_large_execute, timed=F.sample_time,
                 max_batch=F.sample_max_batch)
