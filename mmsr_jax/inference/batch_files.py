"""The files of a batch of inputs: the images an ``--input`` names, the PNG and JSON sidecar each
output goes to, and the refusals that keep an input from being overwritten
(``python -m mmsr_jax.sample``, ``python -m mmsr_jax.controls``).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from mmsr_jax.data import images as image_io

IMAGE_SUFFIXES = image_io.SUFFIXES


def list_inputs(path: str, log: Callable[[str], None] = print) -> list[str]:
  """The image files of ``--input`` (a file, or a folder's files with an image suffix; what a
  folder holds besides is named in a note, never skipped silently)."""
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    files = [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
      raise FileNotFoundError(f"--input={path}: the folder holds no images {IMAGE_SUFFIXES}")
    skipped = [n for n in names if not n.lower().endswith(IMAGE_SUFFIXES)]
    if skipped:
      shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                        else "")
      entries = "entry" if len(skipped) == 1 else "entries"
      log(f"note: --input={path}: skipped {len(skipped)} {entries} without an image suffix "
          f"{IMAGE_SUFFIXES}: {shown}")
    return files
  reason = image_io.missing_file_reason(path)
  if reason is not None:
    raise FileNotFoundError(f"--input={path}: "
                            + ("no such file or folder" if reason == "no such file" else reason))
  return [path]


def output_paths(files: list[str], output: str, other_inputs=()) -> dict[str, str]:
  """Input -> output PNG path; two inputs that would write the same file, or an output that is
  an input (an image or one of ``other_inputs``, e.g. map files), are an error."""
  targets = {f: os.path.join(output, os.path.splitext(os.path.basename(f))[0] + ".png")
             for f in files}
  seen: dict[str, str] = {}
  for f, t in targets.items():
    if t in seen:
      raise ValueError(f"{seen[t]} and {f} would both be written to {t}; rename one")
    seen[t] = f
  refuse_input_overwrite(sidecar_pairs(targets.values()), [*files, *other_inputs],
                         f"--output={output}")
  return targets


def sidecar_pairs(pngs: Iterable[str]) -> list[str]:
  """Each output PNG and its JSON sidecar beside it."""
  return [p for t in pngs for p in (t, os.path.splitext(t)[0] + ".json")]


def refuse_input_overwrite(outputs, inputs, output_flag: str) -> None:
  """ValueError when one of ``outputs`` is one of ``inputs`` (the same file by its real path).
  Refused with --overwrite too: an input is never lost."""
  real = {os.path.realpath(p): p for p in inputs}
  for out in outputs:
    if os.path.realpath(out) in real:
      raise ValueError(f"{output_flag}: {out} would overwrite the input "
                       f"{real[os.path.realpath(out)]}; choose another output folder")
