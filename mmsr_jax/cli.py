"""Command-line plumbing shared by the entry points: errors become one clear line."""

from __future__ import annotations

import sys

from absl import app, logging

from mmsr_jax.runtime import checkpoint as ckpt_lib

# Errors that describe bad input, a bad setting or a run that cannot go on (a non-finite loss
# naming its step, an unreadable checkpoint): printed as one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               FloatingPointError, ckpt_lib.CheckpointError)


def _fail(msg) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def run(main, define_flags=None) -> None:
  """Defines the flags and runs ``main`` under absl, reporting bad flags and inputs as one line
  (exit status 2)."""
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # library chatter off; progress goes to stdout
    try:
      return main(argv)
    except USER_ERRORS as e:
      _fail(e.args[0] if isinstance(e, KeyError) and e.args else e)
  try:
    if define_flags is not None:
      define_flags()  # config_flags parses --config.* overrides here
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
