"""Command-line plumbing shared by the entry points: errors become one clear line."""

from __future__ import annotations

import sys

from absl import app

# Errors that describe bad input or a bad setting: printed as one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def run(main) -> None:
  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
