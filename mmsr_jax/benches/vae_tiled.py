"""``bench vae-tiled``: time and peak memory of the tiled VAE decode the sampler runs for large
outputs, against the untiled decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mmsr_jax.benches import common


def define_flags() -> None:
  flags.DEFINE_integer("vae_size", 2048, "Output side in pixels.")
  flags.DEFINE_integer("vae_tile", 64, "Tile side in latent pixels (64 = 512px tiles).")
  flags.DEFINE_integer("vae_overlap", 16, "Latent pixels shared by neighbouring tiles.")
  flags.DEFINE_enum("vae_arch", "sd", ["sd", "tiny"], "SD KL-f8 VAE or a tiny one.")
  flags.DEFINE_bool("vae_execute", None, "Run the tiled decode (default: on GPU/TPU).")
  flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def _xla_peak(fn, *args) -> int:
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def run() -> dict:
  from mmsr_jax.diffusion import tiles
  from mmsr_jax.models import autoencoder as ae_lib
  from mmsr_jax.models import vae as vae_lib
  F = flags.FLAGS

  arch = vae_lib.VAEConfig(dtype=F.vae_dtype) if F.vae_arch == "sd" else \
      vae_lib.VAEConfig.tiny()
  ae = ae_lib.KLAutoencoder(arch)
  f = ae.downsample
  if F.vae_size % f:
    raise ValueError(f"--vae_size={F.vae_size} is not a multiple of the VAE factor {f}")
  lat = F.vae_size // f
  params = ae.init_params(jax.random.key(0))
  tile = min(F.vae_tile, lat)
  overlap = min(F.vae_overlap, tile - 1)

  def decode_tiled(params, z):
    return tiles.vae_tiled(lambda t: ae.decode(params, t), z, unit_in=1, unit_out=f,
                            tile=tile, overlap=overlap)

  z_spec = jax.ShapeDtypeStruct((1, lat, lat, arch.latent_channels), jnp.float32)
  result = {
      "vae": f"{F.vae_arch} (block_out_channels {list(arch.block_out_channels)})",
      "output": f"{F.vae_size}x{F.vae_size}", "tile_latent": tile, "overlap_latent": overlap,
      "dtype": F.vae_dtype,
      "tiled_peak_bytes_xla": _xla_peak(decode_tiled, params, z_spec),
      "untiled_peak_bytes_xla": _xla_peak(ae.decode, params, z_spec),
  }
  execute = F.vae_execute
  if execute is None:
    execute = jax.devices()[0].platform != "cpu"
  if execute:
    z = jax.random.normal(jax.random.key(1), z_spec.shape)
    run = jax.jit(decode_tiled)
    run_once = lambda: run(params, z).block_until_ready()  # noqa: E731
    result["seconds"] = common.time_call(run_once, repeats=min(common.REPEATS.value, 3))
    out = np.asarray(run_once())
    assert out.shape == (1, F.vae_size, F.vae_size, arch.out_channels), out.shape
    peak = common.peak_device_memory()
    result["peak_memory_bytes"] = peak if peak is not None else common.host_peak_rss()
    result["peak_memory_source"] = "device" if peak is not None else "host RSS"
  return result
