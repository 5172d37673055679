"""The input-size limit: every reader checks a file's header against a pixel limit before
decoding, so a tiny file claiming a huge size (a decompression bomb) is one clear error for the
commands, and a skipped, counted bad image for the training sources."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmsr_jax.schema.sr import sr_config, validate
from mmsr_jax.data import images, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bomb(path, width: int = 12000, height: int = 12000) -> str:
  """A PNG of a few dozen bytes whose header claims ``width x height`` (a 1x1 image with its
  IHDR size and CRC rewritten; the pixel data is that of one pixel)."""
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
  data = bytearray(open(path, "rb").read())
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  open(path, "wb").write(bytes(data))
  return str(path)


@pytest.fixture()
def no_decoding(monkeypatch):
  """Any pixel decoding fails the test: the limit must act on the header alone."""
  def refuse(self, *a, **k):
    raise AssertionError(f"decoded {self.size} although the header is over the limit")
  monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_readers_refuse_by_header_without_decoding(tmp_path, no_decoding):
  bomb = write_bomb(tmp_path / "bomb.png")
  assert os.path.getsize(bomb) < 120
  with Image.open(bomb) as im:  # Pillow believes the header
    assert im.size == (12000, 12000)
  with pytest.raises(ValueError, match=r"bomb.png: 12000x12000 = 144,000,000 pixels by its "
                     r"header, more than --max_pixels=67108864; not decoded"):
    images.read(bomb)
  with pytest.raises(images.BadImage, match=r"^12000x12000 .* config.data.max_image_pixels="):
    images.read_image(bomb)
  with pytest.raises(ValueError, match="--max_pixels=1000"):
    images.header_size(bomb, 1000)
  # Beyond Pillow's own refusal (2 x Image.MAX_IMAGE_PIXELS): still one ValueError naming the file.
  huge = write_bomb(tmp_path / "huge.png", 60000, 60000)
  with pytest.raises(ValueError, match=r"huge.png: more than 178,956,970 pixels .*Pillow refuses"):
    images.read(huge)
  with pytest.raises(images.BadImage, match="decompression bomb"):
    images.read_image(huge)


def test_a_limit_above_the_image_reads_it(tmp_path):
  path = str(tmp_path / "ok.png")
  Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(path)
  assert images.read(path, max_pixels=1200).size == (30, 40)
  with pytest.raises(ValueError, match="40x30 = 1,200 pixels by its header, more than "
                     "--max_pixels=1199"):
    images.read(path, max_pixels=1199)
  assert images.read_image(path, 1200).shape == (30, 40, 3)
  for bad in (0, -5, 2 ** 40, 1.5):
    with pytest.raises(ValueError, match="--max_pixels"):
      images.check_limit(bad, "--max_pixels")


def test_config_fields_are_validated():
  c = sr_config()
  assert c.data.max_image_pixels == images.DEFAULT_MAX_PIXELS
  assert c.sampling.max_input_pixels == images.DEFAULT_MAX_INPUT_PIXELS
  validate(c)
  for field in ("data.max_image_pixels", "sampling.max_input_pixels"):
    bad = sr_config()
    section, name = field.split(".")
    bad[section][name] = 0
    with pytest.raises(ValueError, match=f"config.{field}=0"):
      validate(bad)


def test_training_source_skips_and_counts_a_bomb(tmp_path, monkeypatch):
  real_load = ImageFile.ImageFile.load

  def load_small_only(self, *a, **k):
    assert self.size[0] * self.size[1] <= 40 * 40, f"decoded {self.size}"
    return real_load(self, *a, **k)
  monkeypatch.setattr(ImageFile.ImageFile, "load", load_small_only)

  root = tmp_path / "imgs"
  root.mkdir()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "a.png")
  write_bomb(root / "b_bomb.png")
  Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "c.png")
  config = sr_config()
  config.data.source, config.data.path = "folder", str(root)
  config.data.min_image_size, config.data.max_bad_fraction = 16, 0.9
  config.data.max_image_pixels = 40 * 40  # c.png (48x40) is over the limit too
  src = sources.make_source(config)
  recs = [src[i] for i in range(len(src))]
  assert "bad" not in recs[0] and recs[0]["image"].shape == (40, 40, 3)
  assert "12000x12000" in recs[1]["bad"] and "config.data.max_image_pixels=1600" in recs[1]["bad"]
  assert "48x40" in recs[2]["bad"] and "config.data.max_image_pixels=1600" in recs[2]["bad"]
  st = src.stats()
  assert (st["bad"], st["seen"]) == (2, 3)
  assert st["bad_paths"] == [str(root / "b_bomb.png"), str(root / "c.png")]
  # A source that decodes before we can look (TFDS, shards) is held to the same limit.
  checked = sources.CheckedSource([{"name": "x", "image": np.zeros((40, 41, 3), np.uint8)}],
                                  min_size=16, max_bad_fraction=1.0, max_pixels=1600)
  assert "too large: 40x41" in checked[0]["bad"]


# --- The commands: one ``error:`` line, exit status 2, before any long work.


def _run(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=timeout)
  return r, time.time() - t0


def test_each_command_refuses_a_bomb_in_one_line(tmp_path):
  bomb = write_bomb(tmp_path / "bomb.png")
  folder = tmp_path / "folder"
  folder.mkdir()
  write_bomb(folder / "bomb.png")
  good = tmp_path / "gt"  # an evaluate pair whose prediction is the bomb
  good.mkdir()
  write_bomb(good / "bomb.png", 8, 8)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good / "bomb.png")
  workdir = tmp_path / "run"  # sample reads the run's config before any input
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(sr_config().to_dict()))
  out = tmp_path / "out"
  cases = {
      "sample": (("mmsr_jax.sample", f"--workdir={workdir}", f"--input={bomb}",
                  f"--output={out}"), "more than --max_pixels=4194304"),
      "evaluate": (("mmsr_jax.evaluate", f"--pred={folder}", f"--gt={folder}"),
                   "more than --max_pixels=67108864"),
      "degrade": (("mmsr_jax.degrade", f"--input={bomb}", f"--output={out}"),
                  "more than --max_pixels=67108864"),
      "annotate": (("mmsr_jax.annotate", f"--input={folder}", f"--output={out}"),
                   "none of its 1 images can be used"),
  }
  for name, (args, message) in cases.items():
    r, seconds = _run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name,
                                                                                      r.stderr)
    assert "12000x12000 = 144,000,000 pixels by its header" in lines[0], (name, lines)
    assert message in lines[0], (name, lines)
    assert "bomb.png" in lines[0], (name, lines)
    assert not out.exists(), name
  # evaluate: a prediction over the limit is named too (ground truth fine).
  r, _ = _run("mmsr_jax.evaluate", f"--pred={folder}", f"--gt={good}")
  assert r.returncode == 2 and f"{folder / 'bomb.png'}: 12000x12000" in r.stderr, r.stderr
  # A raised limit is used: the header passes, and the truncated pixel data is the error.
  r, _ = _run("mmsr_jax.degrade", f"--input={bomb}", f"--output={out}", "--max_pixels=150000000")
  assert r.returncode == 2 and "not decoded" not in r.stderr and "bomb.png" in r.stderr, r.stderr


# --- The work of an input: its tiles, not only its pixels.


def _config_only_run(path) -> str:
  """A run folder holding the tiny config and no checkpoint: a command that gets as far as
  loading the model says "no checkpoints", so an earlier refusal is before the model loads."""
  from configs import tiny
  path.mkdir()
  (path / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
  return str(path)


def test_work_limits_bound_tiles_and_aspect_ratio():
  from configs import tiny
  from mmsr_jax.inference.work_limits import WorkLimits, tile_count
  c = tiny.get_config()
  limits = WorkLimits(c)
  # 0: the tiles of the largest square input, which is allowed exactly.
  assert limits.max_tiles == tile_count(c, (2048, 2048)) == 171 * 171
  assert limits.check((2048, 2048)) == limits.max_tiles
  # 300,000 pixels as 3 x 100000 need about four times the tiles of a square of as many pixels.
  assert tile_count(c, (100000, 3)) == 8333 and tile_count(c, (548, 548)) == 2116
  with pytest.raises(ValueError, match=r"^thin.png: 3x100000 has an aspect ratio of 33,333.3:1 "
                     r"\(8,333 tiles for 300,000 pixels\), more than max_aspect_ratio=16 "):
    limits.check((100000, 3), "thin.png")
  few = WorkLimits(c, max_tiles=100, max_aspect_ratio=1e6)
  with pytest.raises(ValueError, match=r"^thin.png: 3x100000 needs 8,333 sampler tiles, more "
                     r"than max_tiles=100 "):
    few.check((100000, 3), "thin.png")
  some = WorkLimits(c, max_tiles=200)
  assert some.check((160, 160)) == 169
  with pytest.raises(ValueError, match="needs 1,600 sampler tiles"):  # smaller tiles: more work
    some.check((160, 160), "a.png", tile=4, overlap=0)
  for bad in ({"max_tiles": -1}, {"max_aspect_ratio": 0.5}):
    with pytest.raises(ValueError, match=list(bad)[0]):
      WorkLimits(c, **bad)


def test_sample_and_controls_refuse_a_thin_image_before_the_model_loads(tmp_path):
  thin = tmp_path / "thin.png"
  Image.fromarray(np.zeros((100000, 3, 3), np.uint8)).save(thin)  # 300,000 pixels
  run = _config_only_run(tmp_path / "run")
  out = tmp_path / "out"
  for args in (("mmsr_jax.sample", f"--input={thin}"), ("mmsr_jax.controls", f"--input={thin}")):
    r, seconds = _run(*args, f"--workdir={run}", f"--output={out}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
    assert lines[0].startswith(f"error: {thin}: 3x100000 has an aspect ratio of 33,333.3:1"), lines
    assert "max_aspect_ratio=16 (config.sampling.max_aspect_ratio; --max_aspect_ratio)" in lines[0]
    assert not out.exists()
  r, _ = _run("mmsr_jax.sample", f"--input={thin}", f"--workdir={run}", f"--output={out}",
              "--max_aspect_ratio=100000", "--max_tiles=5000")
  assert r.returncode == 2 and "needs 8,333 sampler tiles, more than max_tiles=5000" in r.stderr
  # Within every limit, the same command gets as far as the model (this run has no weights).
  r, _ = _run("mmsr_jax.sample", f"--input={thin}", f"--workdir={run}", f"--output={out}",
              "--max_aspect_ratio=100000")
  assert r.returncode == 2 and "no checkpoints" in r.stderr, r.stderr


def test_symlink_loops_and_animations_are_named(tmp_path):
  loop_a, loop_b = tmp_path / "a.png", tmp_path / "b.png"
  os.symlink(loop_b, loop_a)
  os.symlink(loop_a, loop_b)
  with pytest.raises(FileNotFoundError, match="a.png: a loop of symbolic links"):
    images.read(str(loop_a))
  dangling = tmp_path / "gone.png"
  os.symlink(tmp_path / "nowhere.png", dangling)
  with pytest.raises(FileNotFoundError, match=r"gone.png: a symbolic link to .*nowhere.png, "
                     "which does not exist"):
    images.read(str(dangling))
  folder = tmp_path / "inputs"
  folder.mkdir()
  frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
  frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
  (folder / "notes.txt").write_text("not an image")
  pic = images.read(str(folder / "anim.gif"))
  assert pic.frames == 3 and pic.size == (6, 8)
  assert np.allclose(pic.rgb[0, 0], 0.0)  # the first frame
  run = _config_only_run(tmp_path / "run")
  r, _ = _run("mmsr_jax.sample", f"--input={loop_a}", f"--workdir={run}",
              f"--output={tmp_path / 'out'}")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: --input={loop_a}: a loop of symbolic links (it never reaches a file)"], r.stderr
  r, _ = _run("mmsr_jax.sample", f"--input={folder}", f"--workdir={run}",
              f"--output={tmp_path / 'out'}")
  assert r.returncode == 2 and "no checkpoints" in r.stderr, r.stderr  # the gif was taken
  assert (f"note: --input={folder}: skipped 1 entry without an image suffix" in r.stdout
          and "notes.txt" in r.stdout), r.stdout
  assert (f"note: {folder / 'anim.gif'} is an animation of 3 frames; only the first frame is "
          "used") in r.stdout, r.stdout
