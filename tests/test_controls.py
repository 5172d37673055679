"""The controllability figure (``python -m mmsr_jax.controls``): grid pictures laid out rows x
cols of the output size with each cell's exact pixels, one JSON entry per cell with its settings,
the same seed everywhere (so only the control changes a cell), one compiled sampler per guidance
program, and bad flags as one ``error:`` line before the model is built.

Uses the shrunk tiny config with random (perturbed) weights, saved as a real run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmsr_jax.data import images as image_io
from mmsr_jax.inference import control_grid
from mmsr_jax.inference.super_resolver import SuperResolver
from tests.conftest import save_random_run, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
MODES, SCALES = ["cfg", "mcfg"], [0.0, 2.0]
GROUPS, TEMPERATURES = ["depth", "edge"], [0.5, 1.0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, SuperResolver) of a saved run with random weights."""
  path = str(tmp_path_factory.mktemp("run"))
  trainer, state = save_random_run(path, small_config(), devices=jax.devices(), seed=3)
  return path, SuperResolver(trainer.system, state.ema_params, trainer.frozen, step=1,
                             workdir=path)


def _picture(h=9, w=7) -> image_io.Picture:
  rng = np.random.default_rng(0)
  return image_io.Picture(rng.random((h, w, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def figures(run):
  """The two grids of one picture, and how many times the sampler was lowered meanwhile."""
  _, sr = run
  lowered = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" and \
        kw.get("fun_name") == "jit(sample)":
      lowered.append(1)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    axes = control_grid.check_controls(MODES, SCALES, GROUPS, TEMPERATURES)
    depth = np.linspace(0, 1, 36 * 28, dtype=np.float32).reshape(36, 28)
    figs = control_grid.controls_figures(sr, _picture(), axes, caption="a cat",
                                         maps={"depth": depth}, steps=STEPS, seed=5,
                                         guidance="mcfg", scale=2.0)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return figs, len(lowered)


def _cells(fig):
  return {c["label"]: (c, out) for c, out in zip(fig["record"]["cells"], fig["outputs"])}


def test_grid_pictures_hold_every_cell_rows_by_cols(figures):
  figs, _ = figures
  assert set(figs) == {"guidance", "temperature"}
  for name, (rows, cols) in (("guidance", (MODES, SCALES)),
                             ("temperature", (GROUPS, TEMPERATURES))):
    fig = figs[name]
    rec, image = fig["record"], fig["image"]
    assert rec["cell_size"] == [36, 28]
    assert list(image.size[::-1]) == rec["picture_size"]
    assert len(rec["cells"]) == len(fig["outputs"]) == len(rows) * len(cols)
    boxes = {}
    for cell, out in zip(rec["cells"], fig["outputs"]):
      left, top, right, bottom = cell["box"]
      assert (bottom - top, right - left) == (36, 28)
      assert 0 <= left and right <= image.size[0] and 0 <= top and bottom <= image.size[1]
      # The picture shows the sample itself, unscaled.
      np.testing.assert_array_equal(np.asarray(image.crop(cell["box"])),
                                    np.asarray(image_io.to_pil(out).convert("RGB")))
      boxes[cell["row"], cell["col"]] = cell["box"]
    assert sorted(boxes) == [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    for r in range(len(rows)):
      for c in range(len(cols)):
        if c:  # same row: same top, further right, no overlap
          assert boxes[r, c][1] == boxes[r, c - 1][1] and boxes[r, c][0] >= boxes[r, c - 1][2]
        if r:  # next row: below
          assert boxes[r, c][1] >= boxes[r - 1, c][3]
    for ref in rec["references"]:  # input and bicubic above the cells
      assert ref["box"][3] <= min(b[1] for b in boxes.values())


def test_json_has_one_entry_per_cell_with_its_settings(figures):
  figs, _ = figures
  g = figs["guidance"]["record"]
  assert g["rows"] == {"field": "guidance", "values": MODES}
  assert g["columns"] == {"field": "scale", "values": SCALES}
  seen = {(c["settings"]["guidance"], c["settings"]["scale"]) for c in g["cells"]}
  assert seen == {(m, s) for m in MODES for s in SCALES}
  for c in g["cells"]:
    st = c["settings"]
    assert (MODES[c["row"]], SCALES[c["col"]]) == (st["guidance"], st["scale"])
    assert c["label"] == f"{st['guidance']} w={st['scale']:g}"
    assert st["seed"] == 5 and st["steps"] == STEPS and st["caption"] == "a cat"
    assert st["temperature"] == {"text": 1.0, "depth": 1.0, "seg": 1.0, "edge": 1.0}
    assert (st["negative_branch"]["caption"] is None) == (st["scale"] == 0)
  t = figs["temperature"]["record"]
  assert t["rows"] == {"field": "group", "values": GROUPS}
  assert len(t["cells"]) == len(GROUPS) * len(TEMPERATURES)
  for c in t["cells"]:
    st = c["settings"]
    group, value = GROUPS[c["row"]], TEMPERATURES[c["col"]]
    assert st["temperature"] == {k: value if k == group else 1.0 for k in st["temperature"]}
    assert (st["guidance"], st["scale"], st["seed"]) == ("mcfg", 2.0, 5)
    assert st["maps"]["depth"] == "user"
  json.dumps({k: f["record"] for k, f in figs.items()})  # all of it serialisable


def test_only_the_control_changes_a_cell(figures):
  figs, _ = figures
  g = {k: v[1].rgb for k, v in _cells(figs["guidance"]).items()}
  # w = 0 is the conditional sample whatever the mode; w > 0 changes it in every mode.
  np.testing.assert_array_equal(g["cfg w=0"], g["mcfg w=0"])
  for m in MODES:
    assert np.abs(g[f"{m} w=2"] - g[f"{m} w=0"]).max() > 1e-3, m
  assert np.abs(g["cfg w=2"] - g["mcfg w=2"]).max() > 1e-3
  t = {k: v[1].rgb for k, v in _cells(figs["temperature"]).items()}
  # T = 1 is the identity: the temperature grid's setting (mcfg, w=2) with nothing changed.
  np.testing.assert_array_equal(t["depth T=1"], g["mcfg w=2"])
  np.testing.assert_array_equal(t["edge T=1"], g["mcfg w=2"])
  for group in GROUPS:
    assert np.abs(t[f"{group} T=0.5"] - t[f"{group} T=1"]).max() > 1e-3, group


def test_the_sampler_is_compiled_once_per_guidance_program(figures):
  figs, lowered = figures
  # none (w=0), cfg and mcfg; scales and temperatures are inputs, the temperature grid reuses mcfg.
  assert figs["guidance"]["record"]["sampler_programs"] == 3
  assert figs["temperature"]["record"]["sampler_programs"] == 1
  assert lowered == 3


def test_bad_axes_are_refused():
  for args, flag in (((["cfg", "xcfg"], [1], [], []), "--modes"),
                     ((["cfg"], [-1], [], []), "--scales"),
                     ((["cfg"], ["nan"], [], []), "--scales"),
                     (([], [], ["depth", "sky"], [1]), "--temperature_groups"),
                     (([], [], ["depth"], [0]), "--temperatures"),
                     (([], [], ["depth"], [1, 1.0]), "--temperatures"),
                     (([], [1], ["depth"], []), "nothing to draw")):
    with pytest.raises(ValueError, match=flag):
      control_grid.check_controls(*args)
  axes = control_grid.check_controls([], [], ["edge"], [2])
  assert control_grid.grids_to_draw(axes) == ("temperature",)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "mmsr_jax.controls", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(r, *words):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
  for w in words:
    assert w in lines[0], lines[0]
  assert "Traceback" not in r.stderr


def test_cli_refuses_bad_flags_and_overwrites_in_one_line(run, tmp_path):
  workdir, _ = run
  img = tmp_path / "img.png"
  image_io.write_png(str(img), _picture())
  out = tmp_path / "out"
  base = [f"--workdir={workdir}", f"--input={img}", f"--output={out}"]
  _one_error_line(_cli(*base, "--modes=cfg,xcfg"), "--modes", "xcfg")
  _one_error_line(_cli(f"--workdir={workdir}", f"--input={tmp_path / 'none.png'}",
                       f"--output={out}"), "none.png")
  assert not out.exists()  # nothing written
  # An output that already exists; one that is the input (via a link) even with --overwrite.
  out.mkdir()
  (out / "img_guidance.png").write_bytes(b"mine")
  _one_error_line(_cli(*base), "img_guidance.png", "--overwrite")
  os.remove(out / "img_guidance.png")
  os.symlink(img, out / "img_guidance.png")
  _one_error_line(_cli(*base, "--overwrite"), "would overwrite the input")
  assert (out / "img_guidance.png").read_bytes() == img.read_bytes()
  # A user map that an output would replace.
  os.remove(out / "img_guidance.png")
  depth = out / "img_temperature.png"
  image_io.write_png(str(depth), _picture())
  before = depth.read_bytes()
  _one_error_line(_cli(*base, f"--depth={depth}", "--overwrite"), "would overwrite the input",
                  str(depth))
  assert depth.read_bytes() == before
