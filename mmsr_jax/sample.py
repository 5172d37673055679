r"""Super-resolves images x4 with a trained run's EMA weights.

  python -m mmsr_jax.sample --workdir=runs/tiny --input=photo.png --output=out/

Each output is a PNG of the input's kind with a JSON sidecar of every setting used; unset controls
take the run's ``config.sampling`` values. The Python API is
:class:`mmsr_jax.inference.super_resolver.SuperResolver`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from mmsr_jax import cli
from mmsr_jax.data import images as image_io
from mmsr_jax.diffusion.guidance import GUIDANCE_MODES
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.inference.batch_files import list_inputs, output_paths, sidecar_pairs
from mmsr_jax.inference.super_resolver import SuperResolver, parse_temperature
from mmsr_jax.inference.tile_conditions import read_map
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.schema.sr import TEXT_DEVICES

def define_flags() -> None:
  """Flags of the CLI (defined only when run as a program, so importing stays side-effect free)."""
  d = flags
  cli.define_sampling_flags(
      input_help="An image file or a folder of images.",
      output_help="Output folder for the x4 PNGs and their JSON sidecars.",
      seed_help="Noise seed.", map_help="User-supplied {} map (image file), used for every input.")
  d.DEFINE_enum("guidance", None, list(GUIDANCE_MODES), "Guidance mode.")
  d.DEFINE_float("scale", None, "Guidance scale w (0: conditional only).")
  d.DEFINE_string("temperature", "", "Per-group temperature, e.g. depth=0.5,edge=2.")
  d.DEFINE_list("disable", [], "Groups to switch off: text, depth, seg, edge.")
  d.DEFINE_integer("tile", None, "Latent tile side (default: the trained latent size).")
  d.DEFINE_integer("tile_overlap", None, "Latent pixels shared by neighbouring tiles "
                   "(default: a quarter tile).")
  d.DEFINE_integer("tile_batch", None, "Most tiles x guidance branches per denoiser pass "
                   "(lower = less memory for large outputs; default: all at once).")
  d.DEFINE_integer("map_batch", None, "Most tiles whose maps are VQ-encoded at once.")
  d.DEFINE_enum("text_device", None, list(TEXT_DEVICES), "Where the text encoder runs: cpu "
                "keeps its weights on the host (default: config.sampling.text_device, else auto).")


def main(argv):
  del argv
  F = flags.FLAGS
  for name in ("workdir", "input", "output"):
    if not F[name].value:
      raise app.UsageError(f"--{name} is required")
  # Every check on the inputs happens before the model is built or compiled.
  files = list_inputs(F.input, log=lambda s: print(s, flush=True))
  limit = cli.input_limit(F.workdir, F.max_pixels)
  sizes = {}
  for f in files:  # read once to check (decoded again when its turn comes; the header first)
    pic = image_io.read(f, limit)
    sizes[f] = pic.size
    if pic.frames_note(f):
      print(pic.frames_note(f), flush=True)
  run_config = ckpt_lib.load_config(F.workdir)  # fails early on a folder that is not a run
  limits = cli.work_limits(run_config, limit)
  for f in files:  # tiles and aspect ratio: the work, which the pixels alone do not bound
    limits.check(sizes[f], f, tile=F.tile, overlap=F.tile_overlap)
  maps = {k: read_map(F[k].value, k) for k in MODALITIES if F[k].value}
  temperature = parse_temperature(F.temperature)
  for name in F.disable:
    if name not in CONTEXT_GROUPS:
      raise ValueError(f"--disable={name}: expected names from {CONTEXT_GROUPS}")
  enabled = {name: False for name in F.disable}
  if os.path.exists(F.output) and not os.path.isdir(F.output):
    raise NotADirectoryError(f"--output={F.output} exists and is not a folder")
  targets = output_paths(files, F.output, [F[k].value for k in MODALITIES if F[k].value])
  cli.check_writable(F.output, "--output")  # before the model is built
  cli.refuse_existing(sidecar_pairs(targets.values()), F.overwrite)
  cli.lock_if_inside(F.workdir, F.output, "a sampler writing into the run")
  annotator = cli.annotator_from_flags()

  sr = SuperResolver.from_workdir(F.workdir, step=F.step, annotator=annotator,
                                  text_device=F.text_device, max_input_pixels=limit,
                                  max_tiles=limits.max_tiles,
                                  max_aspect_ratio=limits.max_aspect_ratio)
  settings = dict(guidance=F.guidance, scale=F.scale, steps=F.steps, eta=F.eta, seed=F.seed,
                  strength=F.strength, negative_prompt=F.negative_prompt,
                  temperature=temperature, enabled=enabled, tile=F.tile,
                  tile_overlap=F.tile_overlap, tile_batch=F.tile_batch, map_batch=F.map_batch)
  st = sr.resolve(**settings)  # bad values fail here, before the output folder exists
  os.makedirs(F.output, exist_ok=True)
  from tqdm import tqdm
  per_image = sr.num_steps_run(st["steps"], st["strength"])
  bar = tqdm(total=len(files), desc="images", unit="img", disable=not F.progress, position=0)
  steps_bar = tqdm(total=per_image, desc="steps", unit="step", disable=not F.progress,
                   position=1, leave=False)
  for f in files:
    steps_bar.reset(total=per_image)
    steps_bar.set_postfix_str(os.path.basename(f))
    out, record = sr.upscale(image_io.read(f, limit), caption=F.caption, maps=maps,
                             progress=steps_bar.update, **settings)
    image_io.write_png(targets[f], out)
    with open(os.path.splitext(targets[f])[0] + ".json", "w") as fh:
      json.dump({"input": os.path.abspath(f), "output": os.path.abspath(targets[f]),
                 "workdir": os.path.abspath(F.workdir), "checkpoint_step": sr.step,
                 "map_files": {k: F[k].value for k in maps}, **record}, fh, indent=2)
    bar.update(1)
    bar.write(f"{f} {sizes[f][1]}x{sizes[f][0]} -> {targets[f]} "
              f"{record['output_size'][1]}x{record['output_size'][0]} "
              f"({record['num_tiles']} tiles, {record['seconds']:.1f}s)")
  steps_bar.close()
  bar.close()


if __name__ == "__main__":
  cli.run(main, define_flags)
