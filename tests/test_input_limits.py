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

from mmsr_jax.config.sr import sr_config, validate
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
