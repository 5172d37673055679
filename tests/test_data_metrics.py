"""Tests for the demo data, degradation, modality maps, Grain pipeline and PSNR/SSIM metrics."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from skimage.metrics import structural_similarity

from mmsr_jax.schema import tasks
from mmsr_jax.schema.sr import sr_config
from mmsr_jax.evaluation import metrics
from mmsr_jax.data import demo
from mmsr_jax.data.simple_degradation import bicubic_upsample, simple_degrade
from mmsr_jax.data.modalities import MODALITIES, SEG_PALETTE, canny_edges, render_map
from mmsr_jax.data.captions import make_tokenizer
from tests.conftest import apply_overrides
from mmsr_jax.data import sr_eval_examples, sr_examples
from mmsr_jax.data import sources

HR, SCALE, MAP, TEXT_LEN = 64, 4, 64, 32


def _config(**overrides) -> ml_collections.ConfigDict:
  cfg = apply_overrides(sr_config(), {
      "seed": 0, "batch_size": 2, "data.source": "demo", "data.hr_size": HR, "data.scale": SCALE,
      "data.map_size": MAP, "data.num_workers": 0, "data.eval_size": 128,
      "text.max_length": TEXT_LEN})
  return apply_overrides(cfg, overrides)


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer("byte")


# ------------------------------------------------------------------------------------------ demo


def test_demo_records_shapes():
  train = demo.load_demo_records("train")
  val = demo.load_demo_records("val")
  assert [r["name"] for r in val] == ["chelsea", "coffee"]
  assert len(train) == 6 and not {r["name"] for r in train} & {"chelsea", "coffee"}
  for r in train + val:
    assert set(r) == {"name", "image", "depth", "seg", "caption"}
    img = r["image"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 128
    assert r["seg"] is None
    assert isinstance(r["caption"], str) and len(r["caption"].split()) >= 4
    if r["name"] == "stereo_motorcycle":
      assert r["depth"].shape == img.shape[:2] and r["depth"].dtype == np.float32
    else:
      assert r["depth"] is None
  # Cached in-process: the same array objects come back.
  assert demo.load_demo_records("val")[0]["image"] is val[0]["image"]
  with pytest.raises(ValueError, match="split"):
    demo.load_demo_records("test")


def test_stereo_depth_valid():
  (rec,) = [r for r in demo.load_demo_records("train") if r["name"] == "stereo_motorcycle"]
  d = rec["depth"]
  assert np.isfinite(d).all()
  assert d.min() == 0.0 and d.max() == 1.0
  assert d.std() > 0.05
  # Hand-made disparity: inf is invalid -> filled with the min valid (far) -> 0; larger
  # disparity (nearer) -> brighter.
  disp = np.array([[10.0, 20.0], [np.inf, 30.0]], np.float32)
  np.testing.assert_allclose(demo.disparity_to_depth(disp), [[0.0, 0.5], [0.0, 1.0]])


# ------------------------------------------------------------------------------------- degrade


def test_degrade_size_and_determinism():
  hr = demo.load_demo_records("train")[0]["image"][:96, :128].astype(np.float32) / 255.0
  lr1 = simple_degrade(hr, np.random.default_rng(3))
  lr2 = simple_degrade(hr, np.random.default_rng(3))
  lr3 = simple_degrade(hr, np.random.default_rng(4))
  assert lr1.shape == (24, 32, 3) and lr1.dtype == np.float32
  assert 0.0 <= lr1.min() and lr1.max() <= 1.0
  np.testing.assert_array_equal(lr1 * 255.0, np.round(lr1 * 255.0))  # quantised
  np.testing.assert_array_equal(lr1, lr2)
  assert not np.array_equal(lr1, lr3)
  # Still close to a plain downsample of the HR image.
  assert np.abs(lr1 - bicubic_upsample(hr, (24, 32))).mean() < 0.1
  with pytest.raises(ValueError, match=r"\(30, 32, 3\)"):
    simple_degrade(np.zeros((30, 32, 3), np.float32), np.random.default_rng(0))


def test_bicubic_upsample():
  lr = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
  up = bicubic_upsample(lr, (32, 24))
  assert up.shape == (32, 24, 3) and up.dtype == np.float32
  assert up.min() >= 0.0 and up.max() <= 1.0
  assert bicubic_upsample((lr * 255).astype(np.uint8), 16).shape == (16, 16, 3)


# ---------------------------------------------------------------------------------- modalities


def test_modalities():
  assert MODALITIES == ("depth", "seg", "edge")
  lr = demo.load_demo_records("train")[0]["image"][::8, ::8][:32, :32]
  e = canny_edges(lr, 64)
  assert e.shape == (64, 64) and e.dtype == np.float32
  assert set(np.unique(e)) <= {0.0, 1.0} and e.sum() > 0
  np.testing.assert_array_equal(e, canny_edges(lr.astype(np.float32) / 255.0, 64))
  for kind, arr in [("depth", np.linspace(0, 1, 100 * 80).reshape(100, 80)),
                    ("edge", e),
                    ("seg", np.arange(40 * 40).reshape(40, 40) % 7)]:
    m = render_map(kind, arr, 48)
    assert m.shape == (48, 48, 3) and m.dtype == np.float32
    assert -1.0 <= m.min() and m.max() <= 1.0
  d = render_map("depth", np.linspace(0, 1, 64 * 64).reshape(64, 64), 32)
  np.testing.assert_array_equal(d[..., 0], d[..., 2])
  seg = render_map("seg", np.array([[0, 1], [2, 1]]), 2)
  np.testing.assert_array_equal(seg[0, 0], [-1, -1, -1])  # label 0 black
  np.testing.assert_array_equal(seg[0, 1], seg[1, 1])
  np.testing.assert_allclose((seg[1, 0] + 1) * 127.5, SEG_PALETTE[2])
  with pytest.raises(ValueError, match="kind"):
    render_map("normals", e, 8)


# ------------------------------------------------------------------------------------ pipeline

EXPECTED = {
    "hr": ((HR, HR, 3), np.float32),
    "lr": ((HR // SCALE, HR // SCALE, 3), np.float32),
    "depth": ((MAP, MAP, 3), np.float32),
    "seg": ((MAP, MAP, 3), np.float32),
    "edge": ((MAP, MAP, 3), np.float32),
    "present": ((3,), np.bool_),
    "text_ids": ((TEXT_LEN,), np.int32),
    "text_mask": ((TEXT_LEN,), np.int32),
}


def _check_example(ex, lead=()):
  assert set(ex) == set(EXPECTED)
  for k, (shape, dtype) in EXPECTED.items():
    assert ex[k].shape == lead + shape, k
    assert ex[k].dtype == dtype, k
  for k in ("hr", "lr", "depth", "seg", "edge"):
    assert -1.0 <= ex[k].min() and ex[k].max() <= 1.0, k
  assert ex["present"][..., 2].all()
  assert not ex["present"][..., 1].any()
  np.testing.assert_array_equal(ex["seg"], 0.0)
  assert set(np.unique(ex["text_mask"])) <= {0, 1}


def test_training_example(tok):
  t = sr_examples.MakeTrainingExample(HR, SCALE, MAP, TEXT_LEN, tok)
  source = sources.DemoSource("train")
  for i in range(len(source)):
    rec = source[i]
    ex = t.random_map(rec, np.random.default_rng(i))
    _check_example(ex)
    has_depth = rec["depth"] is not None
    assert ex["present"][0] == has_depth
    assert (np.abs(ex["depth"]).sum() > 0) == has_depth
    ids, mask = tok.encode(rec["caption"], TEXT_LEN)
    np.testing.assert_array_equal(ex["text_ids"], ids)
    np.testing.assert_array_equal(ex["text_mask"], mask)
  ex1 = t.random_map(source[0], np.random.default_rng(7))
  ex2 = t.random_map(source[0], np.random.default_rng(7))
  for k in ex1:
    np.testing.assert_array_equal(ex1[k], ex2[k])


def test_loader_batches_and_determinism(tok):
  b1 = next(iter(sr_examples.make_train_loader(_config(), tok)))
  b2 = next(iter(sr_examples.make_train_loader(_config(), tok)))
  b3 = next(iter(sr_examples.make_train_loader(_config(seed=5), tok)))
  _check_example(b1, lead=(2,))
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  assert not np.array_equal(b1["hr"], b3["hr"])


def test_loader_checkpoint_restore(tok, tmp_path):
  cfg = _config()
  it = iter(sr_examples.make_train_loader(cfg, tok))
  for _ in range(2):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (6 records, batch 2)
  fresh = iter(sr_examples.make_train_loader(cfg, tok))
  restored = mngr.restore(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))).data
  mngr.close()
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_config_errors(tok, monkeypatch):
  with pytest.raises(ValueError, match=r"config\.data\.source='nope'.*demo"):
    tasks.validate(_config(**{"data.source": "nope"}))
  monkeypatch.setattr(sources.jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match=r"config\.batch_size=2"):
    sr_examples.make_train_loader(_config(), tok)


def test_eval_examples(tok):
  cfg = _config(**{"data.eval_size": 130})  # clamped down to a multiple of 4
  val = sr_eval_examples.make_eval_examples(cfg, tok)
  again = sr_eval_examples.make_eval_examples(cfg, tok)
  assert [e["name"] for e in val] == ["chelsea", "coffee"]
  for e, f in zip(val, again):
    assert e["hr"].shape == (128, 128, 3) and e["lr"].shape == (32, 32, 3)
    assert e["edge"].shape == (MAP, MAP, 3) and e["present"].dtype == np.bool_
    assert e["caption"] == demo.CAPTIONS[e["name"]]
    for k in EXPECTED:
      np.testing.assert_array_equal(e[k], f[k])
  train = sr_eval_examples.make_eval_examples(_config(**{"data.eval_size": 1000}), tok,
                                               split="train")
  assert len(train) == 6
  for e in train:
    side = e["hr"].shape[0]
    assert side % 4 == 0 and e["lr"].shape[0] == side // 4 and side >= 300


# ------------------------------------------------------------------------------------- metrics


def test_rgb_to_y():
  img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], np.uint8)
  np.testing.assert_allclose(metrics.rgb_to_y(img),
                             [[16 / 255, 235 / 255, (16 + 65.481) / 255]], atol=1e-6)


def test_psnr_hand_computed():
  gt = np.full((16, 16, 3), 100, np.uint8)
  pred = gt + np.uint8(10)
  dy = 10 / 255 * (65.481 + 128.553 + 24.966) / 255  # Y offset of a constant RGB offset
  want = 10 * np.log10(1 / dy**2)
  assert abs(metrics.psnr_y(pred, gt) - want) < 1e-4
  assert abs(metrics.psnr_y(pred.astype(np.float32) / 255, gt) - want) < 1e-4
  assert abs(metrics.psnr_y(jnp.asarray(pred), jnp.asarray(gt)) - want) < 1e-4
  assert metrics.psnr_y(gt, gt) == float("inf")
  assert metrics.psnr_y_np(gt, gt) == float("inf")
  with pytest.raises(ValueError, match="shape"):
    metrics.psnr_y(gt, gt[:8])


def _ssim_pair(kind: str) -> tuple[np.ndarray, np.ndarray]:
  gt = demo.load_demo_records("val")[0]["image"][80:208, 150:278]
  rng = np.random.default_rng(0)
  if kind == "noisy":  # mild noise: contrast-structure stays positive everywhere
    pred = np.clip(gt + rng.normal(0, 6, gt.shape), 0, 255).astype(np.uint8)
  else:  # inverted left half: strongly negative contrast-structure there
    pred = gt.copy()
    pred[:, :64] = 255 - pred[:, :64]
  return pred, gt


def _independent_ssim_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Direct float64 SSIM map with an explicit 2D window loop (no separable trick)."""
  def y255(x):
    x = x.astype(np.float64) / 255
    return np.round(16 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2])

  a, b = y255(pred), y255(gt)
  g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  h, wd = a.shape[0] - 10, a.shape[1] - 10

  def filt(x):
    return sum(w[i, j] * x[i:i + h, j:j + wd] for i in range(11) for j in range(11))

  ma, mb = filt(a), filt(b)
  va, vb, cab = filt(a * a) - ma**2, filt(b * b) - mb**2, filt(a * b) - ma * mb
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  lum = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
  cs = (2 * cab + c2) / (va + vb + c2)
  return lum, cs


def test_ssim_matches_skimage_without_negative_cs():
  pred, gt = _ssim_pair("noisy")
  lum, cs = _independent_ssim_map(pred, gt)
  assert cs.min() > 0  # precondition: the clamp is inactive, so skimage must agree
  y = lambda x: np.round(np.asarray(metrics.rgb_to_y_np(x)) * 255)  # noqa: E731
  # skimage filters the full image (truncate=3.5 -> 11 taps) and averages S[5:-5, 5:-5], which
  # is exactly our 'valid' region.
  ref = structural_similarity(y(pred), y(gt), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255)
  got = metrics.ssim_y(pred, gt)
  assert 0.3 < got < 0.99
  assert abs(got - ref) < 1e-5  # float32 jitted path vs float64 skimage
  assert abs(metrics.ssim_y_np(pred, gt) - ref) < 1e-9
  assert abs(float(np.mean(lum * cs)) - ref) < 1e-9


def test_ssim_clamp_and_identity():
  pred, gt = _ssim_pair("inverted")
  lum, cs = _independent_ssim_map(pred, gt)
  assert cs.min() < -0.1  # the clamp matters here
  want = float(np.mean(lum * np.maximum(cs, 0)))
  assert abs(metrics.ssim_y(pred, gt) - want) < 1e-5
  assert abs(metrics.ssim_y_np(pred, gt) - want) < 1e-9
  assert metrics.ssim_y(pred, gt) > float(np.mean(lum * cs)) + 0.05
  # Identical images -> 1; uint8 and float inputs agree.
  assert abs(metrics.ssim_y(gt, gt) - 1.0) < 1e-6
  np.testing.assert_allclose(metrics.ssim_y(pred.astype(np.float32) / 255, gt),
                             metrics.ssim_y(pred, gt), atol=1e-6)
