r"""Draws the controllability figure of one image: a labelled grid over guidance modes x guidance
scales and one over per-group attention temperatures, every cell with the same seed.

  python -m mmsr_jax.controls --workdir=runs/tiny --input=photo.png --output=out/ \
      [--caption="a cat"] [--modes=cfg,m0cfg,mcfg] [--scales=0,1,2,4] \
      [--temperature_groups=text,depth,seg,edge] [--temperatures=0.5,1,2]

Writes ``<stem>_guidance.png``, ``<stem>_temperature.png`` and ``<stem>_controls.json`` (every
cell's settings and its box in the picture). The work is done by
:mod:`mmsr_jax.inference.control_grid`.
"""

from __future__ import annotations

import os

from absl import app, flags

from mmsr_jax import cli
from mmsr_jax.data import images as image_io
from mmsr_jax.diffusion.guidance import GUIDANCE_MODES
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.inference import control_grid
from mmsr_jax.inference.batch_files import refuse_input_overwrite
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.inference.tile_conditions import read_map
from mmsr_jax.runtime import checkpoint as ckpt_lib


def define_flags() -> None:
  """Flags of the CLI (defined only when run as a program)."""
  d = flags
  cli.define_sampling_flags(
      input_help="One image file.", output_help="Output folder for the grid PNGs and their JSON.",
      seed_help="Noise seed, the same for every cell.",
      map_help="User-supplied {} map (image file).")
  d.DEFINE_list("modes", list(control_grid.DEFAULT_MODES), "Rows of the guidance grid "
                f"({', '.join(GUIDANCE_MODES)}); empty: no guidance grid.")
  d.DEFINE_list("scales", [f"{s:g}" for s in control_grid.DEFAULT_SCALES],
                "Columns of the guidance grid: guidance scales w >= 0.")
  d.DEFINE_list("temperature_groups", list(control_grid.DEFAULT_GROUPS), "Rows of the temperature "
                "grid (text, depth, seg, edge); empty: no temperature grid.")
  d.DEFINE_list("temperatures", [f"{t:g}" for t in control_grid.DEFAULT_TEMPERATURES],
                "Columns of the temperature grid: temperatures > 0 (1: unchanged).")
  d.DEFINE_enum("guidance", None, list(GUIDANCE_MODES), "Guidance mode of the temperature grid "
                "(default: the config's).")
  d.DEFINE_float("scale", None, "Guidance scale of the temperature grid (default: the config's).")


def main(argv):
  del argv
  F = flags.FLAGS
  for name in ("workdir", "input", "output"):
    if not F[name].value:
      raise app.UsageError(f"--{name} is required")
  # Every check on flags and files happens before the model is built.
  axes = control_grid.check_controls(F.modes, F.scales, F.temperature_groups, F.temperatures)
  grids = control_grid.grids_to_draw(axes)
  reason = image_io.missing_file_reason(F.input)
  if reason is not None:
    raise FileNotFoundError(f"--input={F.input}: {reason}; expected one image file")
  limit = cli.input_limit(F.workdir, F.max_pixels)
  run_config = ckpt_lib.load_config(F.workdir)  # fails early on a folder that is not a run
  pic = image_io.read(F.input, limit)
  if pic.frames_note(F.input):
    print(pic.frames_note(F.input), flush=True)
  limits = cli.work_limits(run_config, limit)
  limits.check(pic.size, F.input)  # tiles and aspect ratio, before the model loads
  maps = {k: read_map(F[k].value, k) for k in MODALITIES if F[k].value}
  if os.path.exists(F.output) and not os.path.isdir(F.output):
    raise NotADirectoryError(f"--output={F.output} exists and is not a folder")
  paths = control_grid.output_paths(F.output, grids, F.input)
  refuse_input_overwrite(paths.values(), [F.input, *(F[k].value for k in MODALITIES
                                                      if F[k].value)], f"--output={F.output}")
  cli.check_writable(F.output, "--output")
  cli.refuse_existing(paths.values(), F.overwrite)
  cli.lock_if_inside(F.workdir, F.output, "a sampler writing into the run")
  annotator = cli.annotator_from_flags()

  sr = SuperResolver.from_workdir(F.workdir, step=F.step, annotator=annotator,
                                  max_input_pixels=limit, max_tiles=limits.max_tiles,
                                  max_aspect_ratio=limits.max_aspect_ratio)
  settings = dict(guidance=F.guidance, scale=F.scale, steps=F.steps, eta=F.eta, seed=F.seed,
                  strength=F.strength, negative_prompt=F.negative_prompt)
  sr.resolve(**settings)  # bad values fail here, before anything is sampled or written
  from tqdm import tqdm
  bar = tqdm(total=control_grid.cell_count(axes, grids), desc="cells", unit="cell",
             disable=not F.progress)
  figures = control_grid.controls_figures(sr, pic, axes, caption=F.caption, maps=maps,
                                          progress=lambda: bar.update(1), **settings)
  bar.close()
  control_grid.write_figures(figures, paths, {
      "input": os.path.abspath(F.input), "workdir": os.path.abspath(F.workdir),
      "checkpoint_step": sr.step, "map_files": {k: F[k].value for k in maps}})
  for name, fig in figures.items():
    r = fig["record"]
    print(f"{paths[name]}: {len(r['rows']['values'])} {r['rows']['field']} x "
          f"{len(r['columns']['values'])} {r['columns']['field']}, cells "
          f"{r['cell_size'][1]}x{r['cell_size'][0]}, picture {r['picture_size'][1]}x"
          f"{r['picture_size'][0]}")
  nulls = control_grid.null_groups(figures, axes["groups"])
  if "temperature" in figures and nulls:
    print(f"note: {', '.join(nulls)} had no map (null tokens); their temperatures act on the null "
          "block. Give --depth/--seg or --annotate_depth/--annotate_seg for the real effect.")
  print(f"{paths['json']}: every cell's settings")


if __name__ == "__main__":
  cli.run(main, define_flags)
