"""The controllability figure: one input super-resolved over a grid of guidance modes x guidance
scales and, separately, of per-group attention temperatures, every cell with the same seed so that
the control is the only difference, drawn as labelled PNG grids with a record of every cell.

One :class:`~mmsr_jax.inference.super_resolver.SuperResolver` samples every cell: the guidance
scale and the temperatures are inputs of its jitted sampler, so each guidance mode compiles one
program (scale 0, which has no negative branch, one more) and the temperature grid reuses them.
The command is ``python -m mmsr_jax.controls``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmsr_jax.data import images as image_io
from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.diffusion.guidance import GUIDANCE_MODES
from mmsr_jax.formats.records import CONTEXT_GROUPS

GRIDS = ("guidance", "temperature")
DEFAULT_MODES = GUIDANCE_MODES
DEFAULT_SCALES = (0.0, 1.0, 2.0, 4.0)
DEFAULT_GROUPS = CONTEXT_GROUPS
DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0)

# Drawing: gaps between pictures, the label font's size, background and text colours.
GAP = 6
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _numbers(values: Sequence, flag: str) -> list[float]:
  out = []
  for v in values:
    try:
      x = float(v)
    except (TypeError, ValueError):
      raise ValueError(f"{flag}: {v!r} is not a number") from None
    if not math.isfinite(x):
      raise ValueError(f"{flag}: {v!r} is not a finite number")
    out.append(x)
  return out


def _no_repeats(values: Sequence, flag: str) -> None:
  seen = set()
  for v in values:
    if v in seen:
      raise ValueError(f"{flag}: {v!r} is given twice")
    seen.add(v)


def check_controls(modes: Sequence[str], scales: Sequence, groups: Sequence[str],
                   temperatures: Sequence) -> dict[str, list]:
  """The grid's axes, checked (ValueError naming the flag): modes from ``GUIDANCE_MODES``,
  scales finite and >= 0, groups from ``CONTEXT_GROUPS``, temperatures finite and > 0, none
  given twice. An empty axis skips its grid; skipping both is an error."""
  modes, groups = [str(m).strip() for m in modes], [str(g).strip() for g in groups]
  for m in modes:
    if m not in GUIDANCE_MODES:
      raise ValueError(f"--modes: {m!r} is not a guidance mode; expected names from "
                       f"{GUIDANCE_MODES}")
  for g in groups:
    if g not in CONTEXT_GROUPS:
      raise ValueError(f"--temperature_groups: {g!r} is not a context group; expected names "
                       f"from {CONTEXT_GROUPS}")
  scales = _numbers(scales, "--scales")
  for s in scales:
    if s < 0:
      raise ValueError(f"--scales: {s:g} is negative; guidance scales are >= 0 (0: no guidance)")
  temperatures = _numbers(temperatures, "--temperatures")
  for t in temperatures:
    if t <= 0:
      raise ValueError(f"--temperatures: {t:g} is not > 0 (1 leaves a group unchanged)")
  for values, flag in ((modes, "--modes"), (scales, "--scales"), (groups, "--temperature_groups"),
                       (temperatures, "--temperatures")):
    _no_repeats(values, flag)
  if not (modes and scales) and not (groups and temperatures):
    raise ValueError("nothing to draw: give --modes and --scales, or --temperature_groups and "
                     "--temperatures")
  return {"modes": modes, "scales": scales, "groups": groups, "temperatures": temperatures}


def grids_to_draw(axes: dict[str, list]) -> tuple[str, ...]:
  """The grids whose two axes are both non-empty, in :data:`GRIDS` order."""
  out = []
  if axes["modes"] and axes["scales"]:
    out.append("guidance")
  if axes["groups"] and axes["temperatures"]:
    out.append("temperature")
  return tuple(out)


def output_paths(output: str, grids: Sequence[str], input_path: str) -> dict[str, str]:
  """``{grid: <output>/<stem>_<grid>.png, ..., "json": <output>/<stem>_controls.json}``, named
  after the input's stem (the command refuses a path that is an input)."""
  stem = os.path.splitext(os.path.basename(input_path))[0]
  paths = {g: os.path.join(output, f"{stem}_{g}.png") for g in grids}
  paths["json"] = os.path.join(output, f"{stem}_controls.json")
  return paths


def _fmt(x: float) -> str:
  return f"{x:g}"


@dataclasses.dataclass
class Cell:
  """One sample of a grid: where it goes, its label, and the settings it changes."""

  row: int
  col: int
  label: str
  settings: dict[str, Any]


def guidance_cells(modes: Sequence[str], scales: Sequence[float]) -> list[Cell]:
  """Rows = guidance modes, columns = scales."""
  return [Cell(r, c, f"{m} w={_fmt(s)}", {"guidance": m, "scale": s})
          for r, m in enumerate(modes) for c, s in enumerate(scales)]


def temperature_cells(groups: Sequence[str], temperatures: Sequence[float]) -> list[Cell]:
  """Rows = context groups, columns = that group's temperature (the others stay at 1)."""
  return [Cell(r, c, f"{g} T={_fmt(t)}", {"temperature": {g: t}})
          for r, g in enumerate(groups) for c, t in enumerate(temperatures)]


def sampler_programs(cells: Sequence[Cell], base: dict[str, Any]) -> int:
  """How many sampler programs the cells need: one per guidance mode in use, scale 0 being the
  unguided program (temperatures and scales are inputs, not part of a program)."""
  kinds = set()
  for cell in cells:
    st = {**base, **{k: v for k, v in cell.settings.items() if k in ("guidance", "scale")}}
    kinds.add(st["guidance"] if st["scale"] else "none")
  return len(kinds)


# --- Drawing.


def label_font() -> ImageFont.ImageFont:
  """PIL's built-in font (no file or download): the scalable one where PIL has FreeType, else
  its fixed bitmap font."""
  try:
    return ImageFont.load_default(size=FONT_SIZE)
  except (ImportError, OSError, TypeError, ValueError):
    return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
  left, top, right, bottom = font.getbbox(text)
  return right - left, bottom - top


def _line_height(font) -> int:
  return _text_size(font, "Ag|y")[1] + 4


def _wrap(font, text: str, width: int) -> list[str]:
  """``text`` broken at spaces into lines of at most ``width`` pixels (a longer word alone)."""
  lines: list[str] = []
  for word in text.split(" "):
    if lines and _text_size(font, f"{lines[-1]} {word}")[0] <= width:
      lines[-1] = f"{lines[-1]} {word}"
    else:
      lines.append(word)
  return lines


@dataclasses.dataclass
class Layout:
  """Where everything of a grid picture goes (pixel boxes ``[left, top, right, bottom]``)."""

  size: tuple[int, int]  # (width, height) of the whole picture
  title: list[tuple[str, tuple[int, int]]]  # each title line and its top-left
  references: list[tuple[list[int], tuple[int, int]]]  # (picture box, label position)
  cells: list[tuple[list[int], tuple[int, int]]]  # per cell, row-major


def layout(font, cell_hw: tuple[int, int], rows: int, cols: int, labels: Sequence[str],
           reference_labels: Sequence[str], title: Sequence[str]) -> Layout:
  """The title (wrapped to the picture's width), then a row of reference pictures, then
  ``rows x cols`` cells, each picture with its label above it; every picture is ``cell_hw``
  (the output size) and is never scaled. A column is as wide as its widest label needs when
  that is wider than the picture."""
  h, w = cell_hw
  lh = _line_height(font)
  col_w = max([w] + [_text_size(font, t)[0] + 2 for t in [*labels, *reference_labels]])
  width = GAP + max(cols, len(reference_labels)) * (col_w + GAP)
  y = GAP
  lines = []
  for text in title:
    for line in _wrap(font, text, width - 2 * GAP):
      lines.append((line, (GAP, y)))
      y += lh
  refs = []
  if reference_labels:
    y += GAP
    for i in range(len(reference_labels)):
      x = GAP + i * (col_w + GAP)
      refs.append(([x, y + lh, x + w, y + lh + h], (x, y)))
    y += lh + h + 2 * GAP
  cells = []
  for r in range(rows):
    for c in range(cols):
      x = GAP + c * (col_w + GAP)
      cells.append(([x, y + lh, x + w, y + lh + h], (x, y)))
    y += lh + h + GAP
  return Layout((width, y), lines, refs, cells)


def _rgb8(pic: image_io.Picture) -> Image.Image:
  return image_io.to_pil(pic).convert("RGB")


def draw_grid(title: Sequence[str], references: Sequence[tuple[str, Image.Image]],
              cells: Sequence[tuple[str, Image.Image]], rows: int, cols: int
              ) -> tuple[Image.Image, Layout]:
  """The labelled picture of a grid; ``cells`` row-major, every picture of one size."""
  font = label_font()
  w, h = cells[0][1].size
  lay = layout(font, (h, w), rows, cols, [t for t, _ in cells], [t for t, _ in references],
               title)
  canvas = Image.new("RGB", lay.size, BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for line, xy in lay.title:
    draw.text(xy, line, fill=INK, font=font)
  for (label, im), (box, xy) in zip([*references, *cells], [*lay.references, *lay.cells]):
    draw.text(xy, label, fill=INK, font=font)
    canvas.paste(im, tuple(box[:2]))
  return canvas, lay


# --- Sampling the grids.


def _annotate_once(sr, pic: image_io.Picture, caption: str | None,
                   maps: dict[str, np.ndarray]) -> tuple[str | None, dict, dict]:
  """The annotator's caption / depth / seg for what the user did not give, computed once for
  all cells (``upscale`` would run the annotator per call); returns them with their sources."""
  if sr.annotator is None or (caption is not None and all(k in maps for k in ("depth", "seg"))):
    return caption, maps, {}
  ann = sr.annotator.annotate_one(image_io.to_array(image_io.Picture(pic.rgb, None, False, 8)))
  maps, annotated = dict(maps), {}
  for k in ("depth", "seg"):
    if k in ann and k not in maps:
      maps[k] = annotated[k] = ann[k]
  if caption is None and ann.get("caption"):
    caption = annotated["caption"] = ann["caption"]
  return caption, maps, annotated


def _title(kind: str, st: dict[str, Any], caption: str) -> list[str]:
  if kind == "guidance":
    what = "rows: guidance mode; columns: scale w (0: conditional only)"
    fixed = ""
  else:
    what = "rows: context group; columns: its attention temperature T (others at 1)"
    fixed = f"guidance {st['guidance']} w={_fmt(st['scale'])}, "
  return [what,
          f"{fixed}seed {st['seed']}, {st['steps']} DDIM steps, eta {_fmt(st['eta'])}, "
          f"strength {_fmt(st['strength'])}",
          f"caption: {caption!r}"]


def controls_figures(sr, pic: image_io.Picture, axes: dict[str, list], *,
                     caption: str | None = None, maps: dict[str, np.ndarray] | None = None,
                     progress: Callable[[], None] | None = None, **settings
                     ) -> dict[str, dict[str, Any]]:
  """Samples and draws the grids of ``axes`` (from :func:`check_controls`) for one picture.

  ``settings``: those of ``SuperResolver.resolve`` shared by every cell (seed, steps, strength,
  eta, negative_prompt, and the guidance / scale of the temperature grid); None = the run's.
  ``progress`` is called after each cell. Returns ``{grid: {"image": PIL image, "record":
  {...}, "outputs": [Picture per cell]}}``; the record lists every cell's full settings (the
  sidecar ``upscale`` returns) and its box in the picture.
  """
  if settings.get("temperature"):
    raise ValueError("temperature is an axis of the grids, not a shared setting")
  settings.pop("temperature", None)
  base = sr.resolve(**settings)  # every shared setting checked before the first sample
  sr.check_input_size(pic.size)
  caption, maps, annotated = _annotate_once(sr, pic, caption, dict(maps or {}))
  h, w = pic.size
  s = sr.scale_factor
  lr = _rgb8(pic)
  references = [("input (nearest)", lr.resize((w * s, h * s), Image.NEAREST)),
                ("bicubic", Image.fromarray(bicubic_upsample(np.asarray(lr), (h * s, w * s))))]
  kinds = {"guidance": (guidance_cells, "modes", "scales", "guidance", "scale"),
           "temperature": (temperature_cells, "groups", "temperatures", "group", "temperature")}
  figures = {}
  for name in grids_to_draw(axes):
    make, row_axis, col_axis, row_field, col_field = kinds[name]
    cells = make(axes[row_axis], axes[col_axis])
    outputs, records = [], []
    for cell in cells:
      out, record = sr.upscale(pic, caption=caption, maps=maps,
                               **{**settings, **cell.settings})
      for k in annotated:
        if k == "caption":
          record["caption_source"] = "annotator"
        else:
          record["maps"][k] = "annotator"
      outputs.append(out)
      records.append(record)
      if progress is not None:
        progress()
    rows, cols = len(axes[row_axis]), len(axes[col_axis])
    image, lay = draw_grid(_title(name, base, caption or ""), references,
                           [(c.label, _rgb8(o)) for c, o in zip(cells, outputs)], rows, cols)
    figures[name] = {"image": image, "outputs": outputs, "record": {
        "rows": {"field": row_field, "values": axes[row_axis]},
        "columns": {"field": col_field, "values": axes[col_axis]},
        "picture_size": list(lay.size[::-1]),
        "cell_size": [h * s, w * s],
        "references": [{"label": t, "box": box} for (t, _), (box, _) in
                       zip(references, lay.references)],
        "sampler_programs": sampler_programs(cells, base),
        "cells": [{"row": c.row, "col": c.col, "label": c.label, "box": box, "settings": r}
                  for c, r, (box, _) in zip(cells, records, lay.cells)]}}
  return figures


def cell_count(axes: dict[str, list], grids: Sequence[str]) -> int:
  """The cells of the grids to draw (one sampler call each)."""
  return sum(len(axes[a]) * len(axes[b]) for g, a, b in
             (("guidance", "modes", "scales"), ("temperature", "groups", "temperatures"))
             if g in grids)


def write_figures(figures: dict[str, dict], paths: dict[str, str], about: dict[str, Any]) -> None:
  """Writes each grid picture to its path and one JSON of ``about`` (the input, the run) with
  every file and every grid's record (its cells' settings and boxes)."""
  os.makedirs(os.path.dirname(paths["json"]) or ".", exist_ok=True)
  for name, fig in figures.items():
    fig["image"].save(paths[name], format="PNG")
    fig["record"]["file"] = os.path.abspath(paths[name])
  with open(paths["json"], "w") as fh:
    json.dump({**about, "files": {k: os.path.abspath(p) for k, p in paths.items()},
               "grids": {name: fig["record"] for name, fig in figures.items()}}, fh, indent=2)


def null_groups(figures: dict[str, dict], groups: Sequence[str]) -> list[str]:
  """The temperature groups whose map was absent (the null tokens) in some cell."""
  return sorted({k for fig in figures.values() for c in fig["record"]["cells"]
                 for k, v in c["settings"]["maps"].items() if v == "null" and k in groups})
