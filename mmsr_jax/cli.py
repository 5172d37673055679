"""Command-line plumbing shared by the entry points: flags of the trainers, and errors as one
``error:`` line (exit status 2) instead of a traceback."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.runtime import topology
from mmsr_jax.runtime import workdir as workdir_lib

# Errors that describe bad input, a bad setting or a run that cannot go on (a non-finite loss
# naming its step, an unreadable checkpoint, a read-only or full disk, a truncated file): printed
# as one line, exit status 2.
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, ckpt_lib.CheckpointError)


def _fail(msg) -> None:
  # One line even when a library's message runs to many (TensorStore, PIL): the first says what.
  lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
  print(f"error: {lines[0] if lines else msg}", file=sys.stderr)
  sys.exit(2)


check_writable = workdir_lib.check_writable


def lock_if_inside(workdir: str, output: str, what: str) -> None:
  """Takes ``workdir``'s writer lock (until exit) when ``output`` lies inside it: writing into a
  run that a trainer is writing is refused, as a second trainer is."""
  run, out = os.path.realpath(workdir), os.path.realpath(output)
  if os.path.commonpath([run, out]) == run:
    workdir_lib.acquire(workdir, what)


def define_sampling_flags(input_help: str, output_help: str, seed_help: str,
                          map_help: str) -> None:
  """The flags that ``sample`` and ``controls`` share (the run, input and output, caption,
  sampler settings, user maps, annotators, input limit, overwrite, progress); ``*_help`` are the
  texts that differ between them (``map_help`` takes the map's name)."""
  from mmsr_jax.formats.records import MODALITIES
  d = flags
  d.DEFINE_string("workdir", None, "Training run directory (config + checkpoints).")
  d.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  d.DEFINE_string("input", None, input_help)
  d.DEFINE_string("output", None, output_help)
  d.DEFINE_string("caption", None, "Caption (default: the annotator's, else '').")
  d.DEFINE_string("negative_prompt", None, "Negative prompt (default: the config's).")
  d.DEFINE_integer("steps", None, "DDIM steps.")
  d.DEFINE_float("eta", None, "DDIM eta.")
  d.DEFINE_integer("seed", None, seed_help)
  d.DEFINE_float("strength", None, "1 = from pure noise; < 1 = from the noised upsampled LR.")
  for k in MODALITIES:
    d.DEFINE_string(k, None, map_help.format(k))
  define_annotator_flags()
  d.DEFINE_integer("max_pixels", None, "Largest input image (pixels, checked from each file's "
                   "header before decoding; default: the run's config.sampling.max_input_pixels).")
  define_work_limit_flags()
  d.DEFINE_bool("overwrite", False, "Replace existing outputs (never an input).")
  d.DEFINE_bool("progress", True, "Show progress bars.")


def define_work_limit_flags() -> None:
  """The limits on an input's work beyond its pixels (sample, controls, app)."""
  flags.DEFINE_integer("max_tiles", None, "Most sampler tiles per input (default: the run's "
                       "config.sampling.max_tiles; 0: the tiles of the largest square input).")
  flags.DEFINE_float("max_aspect_ratio", None, "Largest long side / short side of an input "
                     "(default: the run's config.sampling.max_aspect_ratio).")


def work_limits(run_config, max_pixels: int):
  """The :class:`~mmsr_jax.inference.work_limits.WorkLimits` of the run's config with the
  ``--max_*`` flags applied, to check the inputs before the model loads."""
  from mmsr_jax.inference.work_limits import WorkLimits
  F = flags.FLAGS
  return WorkLimits(run_config, max_pixels=max_pixels, max_tiles=F.max_tiles,
                    max_aspect_ratio=F.max_aspect_ratio)


def input_limit(workdir: str, max_pixels: int | None) -> int:
  """The largest input image (pixels): ``--max_pixels`` when given, else the run's
  ``config.sampling.max_input_pixels`` (reading the run's config, so a folder that is not a run
  fails here)."""
  from mmsr_jax.data import images as image_io
  if max_pixels is not None:
    return image_io.check_limit(max_pixels, "--max_pixels")
  run_config = ckpt_lib.load_config(workdir)
  return image_io.check_limit(run_config.sampling.get(
      "max_input_pixels", image_io.DEFAULT_MAX_INPUT_PIXELS), "config.sampling.max_input_pixels")


def define_annotator_flags() -> None:
  """The flags that name annotator models for what an input lacks (sample, controls, app)."""
  d = flags
  d.DEFINE_string("annotate_depth", None, "Depth model (folder or hub id) for missing depth.")
  d.DEFINE_string("annotate_seg", None, "Mask2Former model for missing segmentation.")
  d.DEFINE_string("annotate_caption", None, "Captioning model for a missing caption.")
  d.DEFINE_string("annotate_caption_kind", "blip", "blip, florence2 or qwen2_5_vl.")


def annotator_from_flags():
  """The Annotator the ``--annotate_*`` flags ask for (None when none is given)."""
  F = flags.FLAGS
  if not (F.annotate_depth or F.annotate_seg or F.annotate_caption):
    return None
  from mmsr_jax.data.annotator import Annotator  # torch extras: only when asked for
  return Annotator(depth=F.annotate_depth, seg=F.annotate_seg, caption=F.annotate_caption,
                   caption_kind=F.annotate_caption_kind)


def refuse_existing(paths, overwrite: bool) -> None:
  """FileExistsError naming the first of ``paths`` that exists, unless ``overwrite``."""
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass "
                          "--overwrite to replace")


def run(main, define_flags=None, pass_unknown: bool = False) -> None:
  """Defines the flags and runs ``main`` under absl, reporting bad flags and inputs as one line
  (exit status 2). With ``pass_unknown``, arguments that are not this command's flags reach
  ``main`` in its ``argv`` (after the program name) instead of being an error: the Beam commands
  pass them on as pipeline options, and check them there."""
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # library chatter off; progress goes to stdout
    try:
      return main(argv)
    except USER_ERRORS as e:
      _fail(e.args[0] if isinstance(e, KeyError) and e.args else e)
  topology.keep_accelerator_less_host_on_cpu()  # before anything asks JAX for its devices
  try:
    if define_flags is not None:
      define_flags()  # config_flags parses --config.* overrides here
    _show_own_flags_in_help()
    if pass_unknown:
      app.run(guarded, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
    else:
      app.run(guarded)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised while parsing flags, e.g. a --config.field override that names no field or gives a
    # value of the wrong type (ml_collections raises these before anything runs).
    name = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and name in a]
    where = bad[0] if bad else "command line"
    if isinstance(e, (AttributeError, KeyError)):
      _fail(f"{where}: no such config field ({name!r} is not in the config file's fields)")
    _fail(f"{where}: {e}")


def _show_own_flags_in_help() -> None:
  """``--help`` lists the main module's key flags only; make every flag this project defines
  (in the command, the library or a benchmark) key to it, so ``--help`` shows them all."""
  main = sys.argv[0]
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module == main or "mmsr_jax" in module or module.startswith("configs"):
      for flag in defined:
        flags.FLAGS.register_key_flag_for_module(main, flag)


def run_training(train_fn, default_config: str, workdir_help: str) -> None:
  """The CLI of a trainer: ``--config`` (an ml_collections file, fields overridable with
  ``--config.field=value``) and ``--workdir``; joins the other processes of a multi-host run
  before any JAX work, then ``train_fn(config, workdir)``."""
  from absl import flags
  from ml_collections import config_flags

  from mmsr_jax.runtime import distributed

  def define_flags():
    config_flags.DEFINE_config_file(
        "config", default_config, "Config file (ml_collections); override fields with "
        "--config.field=value.", lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_integer(
        "restore_step", None, "Resume from this checkpoint step instead of the newest good one; "
        "newer steps are moved to WORKDIR/checkpoints_set_aside/ (never deleted).", lower_bound=0)

  def main(argv):
    del argv
    if not flags.FLAGS.workdir:
      raise app.UsageError("--workdir is required")
    distributed.initialize()
    train_fn(flags.FLAGS.config, flags.FLAGS.workdir, restore_step=flags.FLAGS.restore_step)

  run(main, define_flags)
