"""Tests for the training sources: folders, TFDS, bad files, process sharding and resume."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from mmsr_jax.schema import tasks
from mmsr_jax.schema.sr import sr_config
from mmsr_jax.data import sources
from mmsr_jax.data.captions import make_tokenizer
from tests.conftest import apply_overrides
from mmsr_jax.data import degrading_loader, sr_eval_examples, sr_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE, HR = 40, 32


def _config(path, **overrides) -> ml_collections.ConfigDict:
  cfg = apply_overrides(sr_config(), {
      "seed": 0, "batch_size": 2, "data.source": "folder", "data.path": str(path),
      "data.hr_size": HR, "data.scale": 4, "data.map_size": 16, "data.num_workers": 0,
      "data.eval_size": 32, "data.min_image_size": 16, "data.max_bad_fraction": 0.5,
      "data.degradation": "simple", "data.prefetch": 2, "text.max_length": 16})
  return apply_overrides(cfg, overrides)


def _colour(i: int) -> int:
  return 5 + 10 * i  # the red value that identifies image i


def _write_images(root, n: int) -> list[str]:
  """n uniform images in nested folders (LSDIR-like); image i has red = _colour(i)."""
  paths = []
  for i in range(n):
    sub = os.path.join(str(root), f"{i // 4:04d}")
    os.makedirs(sub, exist_ok=True)
    img = np.zeros((SIDE, SIDE, 3), np.uint8)
    img[..., 0] = _colour(i)
    img[..., 1] = 100
    path = os.path.join(sub, f"{i:04d}.png" if i % 2 else f"{i:04d}.jpg")
    Image.fromarray(img).save(path, quality=100)
    paths.append(path)
  return paths


def _ids(batch) -> list[int]:
  """Recovers the image index of each example of a simple-degradation batch from its HR red."""
  red = np.round((batch["hr"][:, 0, 0, 0] + 1.0) * 127.5)
  return [int(round((r - 5) / 10)) for r in red]


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer("byte")


def test_folder_source_recursive_and_captions(tmp_path):
  paths = _write_images(tmp_path, 6)
  with open(os.path.splitext(paths[3])[0] + ".txt", "w") as f:
    f.write("a  red\nsquare ")
  (tmp_path / "notes.md").write_text("not an image")
  src = sources.FolderSource(str(tmp_path))
  assert len(src) == 6 and src.files == sorted(paths)
  rec = src[3]
  assert rec["caption"] == "a red square" and src[0]["caption"] == ""
  assert rec["image"].shape == (SIDE, SIDE, 3) and rec["image"].dtype == np.uint8
  assert int(rec["image"][0, 0, 0]) == _colour(3)
  with pytest.raises(FileNotFoundError, match="no such image folder"):
    sources.FolderSource(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    sources.FolderSource(str(tmp_path / "empty"))


def _write_bad(root) -> list[str]:
  good = np.full((SIDE, SIDE, 3), 77, np.uint8)
  bad = []
  p = os.path.join(str(root), "zz_truncated.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(p)
  data = open(p, "rb").read()
  open(p, "wb").write(data[:len(data) // 2])
  bad.append(p)
  p = os.path.join(str(root), "zz_garbage.jpg")
  open(p, "wb").write(b"this is not a jpeg at all" * 10)
  bad.append(p)
  p = os.path.join(str(root), "zz_tiny.png")
  Image.fromarray(good[:8, :8]).save(p)
  bad.append(p)
  return bad


def test_bad_files_skipped_counted_logged(tmp_path, tok, caplog):
  _write_images(tmp_path, 8)
  bad = _write_bad(tmp_path)
  checked = sources.make_source(_config(tmp_path))
  assert isinstance(checked, sources.CheckedSource) and len(checked) == 11
  with caplog.at_level(logging.WARNING):
    recs = [checked[i] for i in range(len(checked))]
  assert sum("bad" in r for r in recs) == 3
  stats = checked.stats()
  assert stats["seen"] == 11 and stats["bad"] == 3 and sorted(stats["bad_paths"]) == sorted(bad)
  for p in bad:
    assert p in caplog.text
  assert "truncated" in caplog.text or "cannot decode" in caplog.text
  assert "too small: 8x8" in caplog.text
  # Through the loader: one epoch of good images only (8 per epoch, batch 2 -> 4 batches).
  it = iter(sr_examples.make_train_loader(_config(tmp_path), tok))
  seen = [i for _ in range(4) for i in _ids(next(it))]
  assert sorted(seen) == list(range(8))


def test_too_many_bad_files_stop(tmp_path, tok):
  _write_images(tmp_path, 3)
  _write_bad(tmp_path)
  it = iter(sr_examples.make_train_loader(_config(tmp_path, **{"data.max_bad_fraction": 0.1}), tok))
  with pytest.raises(ValueError, match=r"images read so far are bad .*max_bad_fraction"):
    for _ in range(6):
      next(it)
  with pytest.raises(ValueError, match=r"max_bad_fraction=2"):
    tasks.validate(_config(tmp_path, **{"data.max_bad_fraction": 2.0}))
  with pytest.raises(ValueError, match=r"config\.data\.path='': expected a path"):
    tasks.validate(_config(""))


def test_tfds_source_through_data_source(tok):
  """tfds.data_source('div2k') resolved by TFDS with its backing records mocked (no download)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data = [{"hr": np.full((SIDE, SIDE, 3), _colour(i), np.uint8),
           "lr": np.zeros((SIDE // 4, SIDE // 4, 3), np.uint8)} for i in range(6)]
  calls = []
  def fake(builder, split, *args, **kwargs):
    calls.append((builder.name, split))
    return data
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=fake):
    cfg = _config("div2k", **{"data.source": "tfds", "data.tfds_split": "validation"})
    src = sources.make_source(cfg)
    it = iter(sr_examples.make_train_loader(cfg, tok))
    seen = [i for _ in range(3) for i in _ids(next(it))]
  assert ("div2k", "validation") in calls
  assert src.inner.image_key == "hr" and len(src) == 6
  assert int(src[4]["image"][0, 0, 0]) == _colour(4)
  # An example's red channel is uniform, so the batches identify the records: one full epoch.
  assert sorted(seen) == list(range(6))


_SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from tests.test_sources import _config, _ids
    from mmsr_jax.data import sr_examples
    from mmsr_jax.data.captions import make_tokenizer
    cfg = _config(sys.argv[3], batch_size=4)
    it = iter(sr_examples.make_train_loader(cfg, make_tokenizer("byte")))
    ids = [i for _ in range(int(sys.argv[4])) for i in _ids(next(it))]
    print("IDS", json.dumps([jax.process_index(), jax.process_count(), ids]))
""")


def test_two_process_sharding(tmp_path):
  """Two JAX processes (jax.distributed on CPU) see disjoint examples covering the epoch."""
  n = 12
  _write_images(tmp_path / "imgs", n)
  script = tmp_path / "shard.py"
  script.write_text(_SHARD_SCRIPT)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # two processes: no cache hit in only one of them
  # Per process: batch 4 / 2 processes = 2; 6 records per shard -> 3 batches = one epoch.
  procs = [subprocess.Popen(
      [sys.executable, str(script), f"localhost:{port}", str(i), str(tmp_path / "imgs"), "3"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
      for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    line = [ln for ln in out.splitlines() if ln.startswith("IDS ")][-1]
    results.append(json.loads(line[4:]))
  results.sort()
  assert [r[:2] for r in results] == [[0, 2], [1, 2]]
  a, b = set(results[0][2]), set(results[1][2])
  assert len(results[0][2]) == len(a) == 6 and len(results[1][2]) == len(b) == 6
  assert not a & b
  assert a | b == set(range(n))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_realesrgan_loader_resume(tmp_path, tok, prefetch):
  """Checkpointing the degrading iterator (prefetch thread included) resumes exactly."""
  _write_images(tmp_path / "imgs", 5)
  cfg = _config(tmp_path / "imgs", **{"data.degradation": "realesrgan",
                                       "data.prefetch": prefetch})
  loader = sr_examples.make_train_loader(cfg, tok)
  assert isinstance(loader, degrading_loader.DegradedLoader)
  it = iter(loader)
  first = next(it)
  assert first["lr"].shape == (2, HR // 4, HR // 4, 3)
  assert first["edge"].shape == (2, 16, 16, 3) and first["present"][:, 2].all()
  assert not any(k.startswith("deg_") for k in first)
  lr01 = (first["lr"] + 1) / 2
  np.testing.assert_allclose(lr01 * 255, np.round(lr01 * 255), atol=1e-3)
  next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary (5 records)
  fresh = iter(sr_examples.make_train_loader(cfg, tok))
  next(fresh)  # a started iterator (its prefetch running) is reset by the restore
  restored = mngr.restore(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))).data
  mngr.close()
  for want in expected:
    got = next(restored)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_examples_from_folder_with_realesrgan(tmp_path, tok):
  """Held-out crops from config.data.eval_path, degraded with the configured preset, fixed per
  image name (the same on every call)."""
  _write_images(tmp_path / "val", 2)
  cfg = _config(tmp_path / "imgs", **{"data.degradation": "seesr",
                                       "data.eval_path": str(tmp_path / "val")})
  ex = sr_eval_examples.make_eval_examples(cfg, tok)
  again = sr_eval_examples.make_eval_examples(cfg, tok)
  assert [e["name"] for e in ex] == ["0000/0000.jpg", "0000/0001.png"]
  for a, b in zip(ex, again):
    assert a["hr"].shape == (32, 32, 3) and a["lr"].shape == (8, 8, 3)
    for k in ("hr", "lr", "edge", "present", "text_ids"):
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(ex[0]["lr"][..., 1], ex[1]["lr"][..., 1])  # per-name seeds
  with pytest.raises(ValueError, match="config.data.degradation='x'"):
    tasks.validate(_config(tmp_path, **{"data.degradation": "x"}))


def test_degradation_split_over_the_local_devices_equals_one_device(monkeypatch):
  """The jitted stages run on every local device (8 fake CPUs here), each on its rows of the
  batch, and give what a single device gives for the same parameters."""
  import jax
  from mmsr_jax.data import realesrgan, realesrgan_params
  b, side = 8, 32
  hr = np.random.default_rng(0).random((b, side, side, 3)).astype(np.float32)
  params = realesrgan_params.stack_params([realesrgan_params.sample_params(
      np.random.default_rng(i), (side, side), realesrgan_params.REALESRGAN, 4) for i in range(b)])
  used = []
  stage = realesrgan._stage_batch  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    out = stage(*args, **kwargs)
    used.append(len(out.sharding.device_set))
    return out

  monkeypatch.setattr(realesrgan, "_stage_batch", spy)
  split = realesrgan.RealESRGANDegrader("realesrgan", 4)(hr, params)
  assert used == [8, 8]
  one = realesrgan.RealESRGANDegrader("realesrgan", 4, devices=jax.local_devices()[:1])(hr, params)
  assert used[2:] == [1, 1]
  np.testing.assert_allclose(split, one, atol=1e-6)
  deg = realesrgan.RealESRGANDegrader("realesrgan", 4)
  assert [len(deg.batch_sharding(n).device_set) for n in (6, 7, 16)] == [6, 7, 8]
