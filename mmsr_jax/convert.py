r"""Converts public PyTorch weights into the Flax trees the configs read.

  python -m mmsr_jax.convert --kind=vae    --src=stabilityai/sd-vae-ft-ema --dst=weights/sd_vae_ft_ema
  python -m mmsr_jax.convert --kind=t5     --src=google/t5-v1_1-xxl      --dst=weights/t5_v1_1_xxl
  python -m mmsr_jax.convert --kind=pixart --src=PixArt-alpha/PixArt-XL-2-512x512 --dst=weights/pixart
"""

from __future__ import annotations

import os

from absl import flags

from mmsr_jax import cli
from mmsr_jax.weights.converter import (CONFIG_FILE, KINDS, PARAMS_FILE, convert_to_folder,
                                        override_flags)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.src or not f.dst:
    raise ValueError("--src and --dst are required")
  info = convert_to_folder(f.kind, f.src, f.dst, src_config=f.src_config)
  print(f"wrote {os.path.join(f.dst, PARAMS_FILE)} ({info['num_params']:,} parameters) and "
        f"{os.path.join(f.dst, CONFIG_FILE)}")
  sched = info.get("training_schedule")
  if sched:
    print(f"trained with {sched['schedule']} betas {sched['beta_start']:g} -> "
          f"{sched['beta_end']:g} over {sched['num_timesteps']} steps, {sched['prediction']} "
          f"prediction ({sched['source']}); train with the same schedule")
  print("use it with:\n  " + " \\\n  ".join(override_flags(f.kind, f.dst, info)))


def define_flags() -> None:
  flags.DEFINE_enum("kind", None, KINDS, "What to convert.", required=True)
  flags.DEFINE_string("src", None, "Local model folder, pipeline folder, .safetensors file, or "
                      "hub id (online machines).")
  flags.DEFINE_string("dst", None, "New folder for params.safetensors and config.json.")
  flags.DEFINE_string("src_config", "", "config.json of the source when it is not beside the "
                      "weights.")


if __name__ == "__main__":
  cli.run(main, define_flags)
