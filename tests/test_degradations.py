"""Tests for the Real-ESRGAN / SeeSR degradation: kernels, parameter ranges, each device stage
against an independent computation (torch F.interpolate, scipy correlation), noise statistics,
exact output sizes and determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from mmsr_jax.data import realesrgan as R
from mmsr_jax.data import realesrgan_params as P

N_DRAWS = 400


def _draws(preset, n=N_DRAWS, hw=(64, 64)):
  return [P.sample_params(np.random.default_rng(i), hw, preset) for i in range(n)]


@pytest.mark.parametrize("preset", [P.REALESRGAN, P.SEESR], ids=lambda p: p.name)
def test_kernels_sum_to_one_and_families(preset):
  rng = np.random.default_rng(0)
  types = []
  for stage in (preset.first, preset.second):
    for _ in range(300):
      k, info = P.random_blur_kernel(rng, stage, preset.kernel_range)
      assert k.shape == (21, 21) and k.dtype == np.float32
      np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)
      assert info["size"] in range(7, 22, 2)
      # Zero outside the drawn support (padded to 21).
      p = (21 - info["size"]) // 2
      if p:
        assert not k[:p].any() and not k[:, :p].any()
      if info["type"] == "sinc":
        lo = np.pi / 3 if info["size"] < 13 else np.pi / 5
        assert lo <= info["cutoff"] <= np.pi
      else:
        sx, sy = info["sigma"]
        assert stage.blur_sigma[0] <= min(sx, sy) <= max(sx, sy) <= stage.blur_sigma[1]
        if info["type"].startswith("generalized"):
          assert stage.betag[0] <= info["beta"] <= stage.betag[1]
        if info["type"].startswith("plateau"):
          assert stage.betap[0] <= info["beta"] <= stage.betap[1]
      types.append(info["type"])
  share_sinc = types.count("sinc") / len(types)
  assert 0.05 < share_sinc < 0.15  # p = 0.1
  share_iso = types.count("iso") / (len(types) - types.count("sinc"))
  assert 0.38 < share_iso < 0.52  # p = 0.45
  assert set(types) == set(P.KERNEL_TYPES) | {"sinc"}
  # Isotropic Gaussian of known sigma: matches the closed form.
  k = P.gaussian_family_kernel("iso", 21, 2.0, 2.0, 0.0)
  x = np.arange(21) - 10
  g = np.exp(-x ** 2 / 8.0)
  np.testing.assert_allclose(k, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-7)
  np.testing.assert_allclose(P.sinc_kernel(np.pi / 2, 21).sum(), 1.0, atol=1e-7)


@pytest.mark.parametrize("preset", [P.REALESRGAN, P.SEESR], ids=lambda p: p.name)
def test_parameter_ranges(preset):
  draws = _draws(preset, hw=(64, 64))
  for stage, key in ((preset.first, "noise1"), (preset.second, "noise2")):
    noise = np.stack([d[key] for d in draws])
    sig = noise[:, 1] * 255
    assert stage.noise_range[0] <= sig.min() and sig.max() <= stage.noise_range[1]
    assert stage.poisson_scale_range[0] <= noise[:, 3].min()
    assert noise[:, 3].max() <= stage.poisson_scale_range[1]
    assert abs(noise[:, 0].mean() - stage.gaussian_noise_prob) < 0.08
    assert abs(noise[:, 2].mean() - stage.gray_noise_prob) < 0.08
  jq = np.stack([d["jpeg"] for d in draws])
  assert preset.first.jpeg_range[0] <= jq[:, 0].min() and jq[:, 0].max() <= preset.first.jpeg_range[1]
  assert preset.second.jpeg_range[0] <= jq[:, 1].min()
  assert jq[:, 1].max() <= preset.second.jpeg_range[1]
  s1 = np.stack([d["size1"] for d in draws])[:, 0] / 64
  lo1, hi1 = preset.first.resize_range
  assert lo1 - 1 / 64 <= s1.min() and s1.max() <= hi1
  s2 = np.stack([d["size2"] for d in draws])[:, 0] / 16
  lo2, hi2 = preset.second.resize_range
  assert lo2 - 1 / 16 <= s2.min() and s2.max() <= hi2
  # Stage-1 direction probabilities (up, down, keep) = resize_prob.
  up, keep = np.mean(s1 > 1), np.mean(s1 == 1)
  assert abs(up - preset.first.resize_prob[0]) < 0.07
  assert abs(keep - preset.first.resize_prob[2]) < 0.06
  is_delta = lambda k: k[10, 10] == 1.0
  final_sinc = np.mean([not is_delta(d["sinc"]) for d in draws])
  assert abs(final_sinc - preset.final_sinc_prob) < 0.07
  blur2 = np.mean([not is_delta(d["k2"]) for d in draws])
  assert abs(blur2 - preset.second.blur_prob) < 0.07
  assert abs(np.mean([d["order"] for d in draws]) - 0.5) < 0.08
  modes = np.stack([d["mode"] for d in draws])
  assert set(np.unique(modes)) == {0, 1, 2}


@pytest.mark.parametrize("mode", P.RESIZE_MODES)
@pytest.mark.parametrize("n_in,n_out", [(37, 11), (12, 29), (20, 20), (64, 16)])
def test_resize_matrix_matches_torch(mode, n_in, n_out):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).random((n_in, n_in)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(n_out, n_out),
                                         mode=mode, **({} if mode == "area" else
                                                       {"align_corners": False}))[0, 0].numpy()
  m = R.resize_matrix(n_in, n_out, mode, n_out + 3, n_in + 2)
  assert not m[n_out:].any() and not m[:, n_in:].any()
  xp = np.pad(x, ((0, 2), (0, 2)), constant_values=9.0)  # canvas junk must not leak in
  got = np.asarray(R._resize(jnp.asarray(xp[..., None]), jnp.asarray(m), jnp.asarray(m)))
  np.testing.assert_allclose(got[:n_out, :n_out, 0], want, atol=2e-5)
  assert not got[n_out:].any()


@pytest.mark.parametrize("impl", ["fft", "conv"])
@pytest.mark.parametrize("valid", [(30, 30), (17, 23)])
def test_blur_reflect_matches_scipy(valid, impl, monkeypatch):
  """Blur on a canvas = scipy correlation of the valid region with 'mirror' (torch reflect)."""
  rng = np.random.default_rng(1)
  canvas = rng.random((30, 30, 3)).astype(np.float32)
  monkeypatch.setattr(R, "BLUR_IMPL", impl)
  h, w = valid
  k = P.pad_kernel(P.gaussian_family_kernel("aniso", 9, 2.5, 0.7, 0.6))
  ih, iw = R.reflect_index(h, 30, 10), R.reflect_index(w, 30, 10)
  got = np.asarray(R._blur(jnp.asarray(canvas), jnp.asarray(k), jnp.asarray(ih),
                           jnp.asarray(iw)))[:h, :w]
  want = np.stack([scipy.ndimage.correlate(canvas[:h, :w, c].astype(np.float64), k,
                                           mode="mirror") for c in range(3)], -1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.shape == (h, w, 3)


def test_poisson_sampler_statistics():
  lam = jnp.repeat(jnp.array([0.3, 2.0, 7.5, 11.9, 40.0, 200.0]), 20000)
  x = np.asarray(R.poisson(jax.random.key(0), lam)).reshape(6, -1)
  assert (x == np.round(x)).all() and (x >= 0).all()
  for row, l in zip(x, [0.3, 2.0, 7.5, 11.9, 40.0, 200.0]):
    se = np.sqrt(l / row.size)
    assert abs(row.mean() - l) < 5 * se + 0.01
    assert abs(row.var() / l - 1.0) < 0.06


def test_noise_levels():
  x = jnp.full((64, 64, 3), 0.5, jnp.float32)
  valid = jnp.array([64, 64])
  key = jax.random.key(3)
  for sigma in (1 / 255, 10 / 255, 30 / 255):
    out = R._noise(x, jnp.array([1.0, sigma, 0.0, 1.0]), key, valid)
    d = np.asarray(out - x)
    assert abs(d.std() / sigma - 1) < 0.05 and abs(d.mean()) < 3 * sigma / 64
  grey = np.asarray(R._noise(x, jnp.array([1.0, 0.1, 1.0, 1.0]), key, valid))
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  colour = np.asarray(R._noise(x, jnp.array([1.0, 0.1, 0.0, 1.0]), key, valid))
  assert not np.array_equal(colour[..., 0], colour[..., 1])
  # Poisson on an image with 2 grey levels: v = 2, so on the 0.2 half the noise is
  # (Poisson(0.4) / 2 - 0.2) * scale, std sqrt(0.2 / 2) * scale (clamping is negligible there).
  two = jnp.asarray(np.where(np.arange(64)[:, None, None] < 32, 0.2, 0.6) * np.ones((64, 64, 3)),
                    jnp.float32)
  img = np.round(np.asarray(two) * 255) / 255
  for scale in (0.3, 0.5):
    d = (np.asarray(R._noise(two, jnp.array([0.0, 0.0, 0.0, scale]), key, valid)) - img)[:32]
    assert abs(d.std() / (np.sqrt(img[0, 0, 0] / 2) * scale) - 1) < 0.08
    assert abs(d.mean()) < 0.01


def _hr(h, w, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.random((h // 8, w // 8, 3)).astype(np.float32)
  return np.asarray(jax.image.resize(base, (h, w, 3), "bicubic")).clip(0, 1)


@pytest.mark.parametrize("preset", ["realesrgan", "seesr"])
def test_degrader_sizes_quantisation_determinism(preset):
  deg = R.RealESRGANDegrader(preset, scale=4)
  hr = np.stack([_hr(32, 48, s) for s in range(3)])
  params = [deg.sample(np.random.default_rng(100 + i), (32, 48)) for i in range(3)]
  out = deg(hr, P.stack_params(params))
  assert out.shape == (3, 8, 12, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(out * 255, np.round(out * 255))
  # Same (seed, example) -> same output, also alone instead of in a batch.
  for i in range(3):
    alone = deg(hr[i:i + 1], P.stack_params(params[i:i + 1]))
    np.testing.assert_array_equal(alone[0], out[i])
  np.testing.assert_array_equal(deg(hr, P.stack_params(params)), out)
  # Different seeds -> different outputs.
  other = deg(hr, P.stack_params([deg.sample(np.random.default_rng(7 + i), (32, 48))
                                  for i in range(3)]))
  assert all(not np.array_equal(a, b) for a, b in zip(out, other))
  # The LR keeps the content: close to the area-downsampled HR on average.
  area = hr.reshape(3, 8, 4, 12, 4, 3).mean((2, 4))
  assert np.abs(out - area).mean() < 0.2


def test_degrader_errors():
  deg = R.RealESRGANDegrader("realesrgan")
  with pytest.raises(ValueError, match="not divisible by scale=4"):
    deg(np.zeros((1, 30, 32, 3), np.float32), {})
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    deg(np.zeros((30, 32, 3), np.float32), {})
  with pytest.raises(ValueError, match="preset 'x'"):
    R.RealESRGANDegrader("x")


def test_degrade_cli(tmp_path):
  """python -m mmsr_jax.degrade: samples of exactly H/4 x W/4, parameters, a contact sheet; no
  silent overwrite."""
  import json
  import os
  import subprocess
  import sys

  import cv2
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  img = (_hr(64, 96) * 255).round().astype(np.uint8)
  cv2.imwrite(str(tmp_path / "in.png"), img[..., ::-1])
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmd = [sys.executable, "-m", "mmsr_jax.degrade", f"--input={tmp_path / 'in.png'}",
         f"--output={tmp_path / 'out'}", "--num=3", "--seed=1", "--preset=seesr"]
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for i in range(3):
    lr = cv2.imread(str(tmp_path / "out" / f"lr_{i:02d}.png"))
    assert lr.shape == (16, 24, 3)
    p = json.loads((tmp_path / "out" / f"params_{i:02d}.json").read_text())
    assert p["seed"] == [1, i] and p["preset"] == "seesr" and p["lr_size"] == [16, 24]
  sheet = cv2.imread(str(tmp_path / "out" / "contact_sheet.png"))
  assert sheet.shape == (2 * 64, 2 * 96, 3)  # HR + 3 samples on a 2x2 grid
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "pass --overwrite" in r.stderr


def test_device_side_jpeg_equals_the_float_round_trip():
  """The degrader quantises on the device and sends uint8 to the host: the selected canvases'
  valid regions must equal ``jpeg`` of the float image (channel order, rounding), the rest of a
  selected canvas keeps its content to 1/255 and unselected canvases stay as they were."""
  deg = R.RealESRGANDegrader("realesrgan", 4)
  x = np.stack([_hr(40, 56, s) for s in range(4)]).astype(np.float32)
  x[..., 0] *= 0.5  # unequal channels, so a swapped channel order changes the JPEG
  valid = np.array([[40, 56], [33, 21], [40, 56], [17, 50]])
  quality = np.array([35.0, 60.0, 90.0, 47.4])
  which = np.array([True, True, False, True])
  sharding = deg.batch_sharding(4)
  got = np.asarray(deg._jpeg(jax.device_put(x, sharding), valid, quality, which, sharding))
  for i in range(4):
    h, w = valid[i]
    if not which[i]:
      np.testing.assert_array_equal(got[i], x[i])
      continue
    # (XLA may divide by 255 as a product with 1/255: one float32 ulp)
    np.testing.assert_allclose(got[i, :h, :w], R.jpeg(x[i, :h, :w], quality[i]), rtol=0,
                               atol=1.2e-7)
    rest = np.ones((40, 56), bool)
    rest[:h, :w] = False
    np.testing.assert_allclose(got[i][rest], x[i][rest], atol=0.5 / 255 + 1e-6)
  assert deg.jpeg_cpu_seconds > 0 and deg.host_cpu_seconds >= deg.jpeg_cpu_seconds
