"""Evaluation: NIQE against a direct float64 NumPy computation, batched PSNR/SSIM, LPIPS / DISTS
parity with torchmetrics' PyTorch implementations (same random backbones, the heads the wheel
ships), the weight converter, the evaluate CLI / API and benchmark mode end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import convolve
from scipy.special import gamma
from skimage import data as skdata

from mmsr_jax.evaluation import metrics, niqe
from mmsr_jax.weights import params_io
from tests.conftest import small_config
from mmsr_jax.training import sr_task
from mmsr_jax.inference import quality
from mmsr_jax.weights import metric_nets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ direct NumPy NIQE (float64)


def _ref_aggd(v):
  v = v.ravel()
  gam = np.arange(0.2, 10.001, 0.001)
  r_gam = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
  left = np.sqrt(np.mean(v[v < 0] ** 2))
  right = np.sqrt(np.mean(v[v > 0] ** 2))
  g = left / right
  rhat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
  rn = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
  a = gam[np.argmin((r_gam - rn) ** 2)]
  f = np.sqrt(gamma(1 / a) / gamma(3 / a))
  return a, left * f, right * f


def _ref_features(block):
  a, bl, br = _ref_aggd(block)
  out = [a, (bl + br) / 2]
  for s in [(0, 1), (1, 0), (1, 1), (1, -1)]:
    a, bl, br = _ref_aggd(block * np.roll(block, s, axis=(0, 1)))
    out += [a, (br - bl) * gamma(2 / a) / gamma(1 / a), bl, br]
  return out


def _ref_half(img):
  """MATLAB imresize(img, 0.5, 'bicubic') written out sample by sample."""
  def cubic(x):
    ax = abs(x)
    if ax <= 1:
      return 1.5 * ax**3 - 2.5 * ax**2 + 1
    return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2 if ax <= 2 else 0.0

  def along0(x):
    n = x.shape[0]
    out = np.zeros((math.ceil(n / 2),) + x.shape[1:])
    for o in range(out.shape[0]):
      u = (o + 1) * 2 - 0.5  # centre of output sample o in 1-based input coordinates
      ws, js = [], []
      for i in range(math.floor(u - 4), math.floor(u - 4) + 10):
        ws.append(0.5 * cubic((u - i) * 0.5))
        j = i - 1
        js.append(-j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j))
      ws = np.array(ws) / np.sum(ws)
      out[o] = sum(w * x[j] for w, j in zip(ws, js))
    return out
  return along0(along0(img).T).T


def _ref_niqe(y):
  p = niqe.pristine_params()
  h, w = (y.shape[0] // 96) * 96, (y.shape[1] // 96) * 96
  img = y[:h, :w].astype(np.float64)
  feats = []
  for scale in (1, 2):
    mu = convolve(img, p["window"], mode="nearest")
    sig = np.sqrt(np.abs(convolve(img * img, p["window"], mode="nearest") - mu * mu))
    n = (img - mu) / (sig + 1)
    b = 96 // scale
    feats.append(np.array([_ref_features(n[i * b:(i + 1) * b, j * b:(j + 1) * b])
                           for i in range(h // 96) for j in range(w // 96)]))
    if scale == 1:
      img = _ref_half(img / 255.0) * 255.0
  f = np.concatenate(feats, axis=1)
  cov = np.cov(f[~np.isnan(f).any(axis=1)], rowvar=False)
  d = p["mu"] - np.nanmean(f, axis=0)
  return float(np.sqrt(d @ np.linalg.pinv((p["cov"] + cov) / 2) @ d)), f


@pytest.fixture(scope="module")
def photo():
  return skdata.astronaut()[40:232, 100:388]  # 192x288: 2x3 NIQE blocks


def test_niqe_matches_direct_numpy(photo):
  rng = np.random.default_rng(0)
  noisy = np.clip(photo + rng.normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
  batch = np.stack([photo, noisy])
  got = niqe.niqe(batch)
  for img, g in zip(batch, got):
    y = np.round(img.astype(np.float64) / 255 @ np.array([0.299, 0.587, 0.114]) * 255)
    want, f_ref = _ref_niqe(y)
    f = np.asarray(niqe.niqe_features(niqe.luminance255(img[None])[:, :192, :288]))[0]
    assert f.shape == (6, 36)
    # Features to float32 accuracy, except where the AGGD shape grid search picks a neighbouring
    # grid point (steps of 0.001); the score to 2e-3 relative (the pseudo-inverse of a covariance
    # from six blocks amplifies those small steps).
    np.testing.assert_allclose(f, f_ref, rtol=1e-3, atol=1e-2)
    assert np.isclose(f, f_ref, rtol=1e-3, atol=1e-3).mean() > 0.95
    assert abs(g - want) < 2e-3 * want, (g, want)
  assert got[1] > got[0] + 1  # noise makes an image less natural
  # The BasicSR convention (MATLAB YCbCr Y) is available and differs slightly.
  assert abs(niqe.niqe(photo, color="ycbcr")[0] - got[0]) < 0.5
  with pytest.raises(ValueError, match="two 96x96 blocks"):
    niqe.niqe(photo[:96, :96])


def test_matlab_resize_matrix():
  x = np.random.default_rng(1).uniform(0, 255, (20, 14))
  m_h = niqe.matlab_resize_matrix(20, 10, 0.5)
  m_w = niqe.matlab_resize_matrix(14, 7, 0.5)
  np.testing.assert_allclose(m_h @ x @ m_w.T, _ref_half(x), atol=1e-10)
  np.testing.assert_allclose(m_h.sum(axis=1), 1.0, atol=1e-12)  # constants stay constant
  got = np.asarray(niqe._half_size(jnp.asarray(x[None], jnp.float32)))[0]
  np.testing.assert_allclose(got, _ref_half(x), atol=2e-3)


def test_niqe_aggd_hand_values():
  # A symmetric +-1 sample: left = right = 1, rhat = 1 -> the grid point where r(alpha) is
  # closest to 1 (alpha -> large), beta = sqrt(G(1/a) / G(3/a)).
  v = jnp.asarray(np.tile([-1.0, 1.0], 50), jnp.float32)
  (a, bl, br), _ = niqe._aggd(v)
  gam = np.arange(0.2, 10.001, 0.001)
  r = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
  want_a = gam[np.argmin((r - 1.0) ** 2)]
  assert abs(float(a) - want_a) < 1e-6 and want_a > 9.9
  np.testing.assert_allclose([float(bl), float(br)],
                             np.sqrt(gamma(1 / want_a) / gamma(3 / want_a)), rtol=1e-5)
  # Laplacian-like data gives alpha near 1; Gaussian data near 2.
  rng = np.random.default_rng(0)
  (a1, _, _), _ = niqe._aggd(jnp.asarray(rng.laplace(size=200000), jnp.float32))
  (a2, _, _), _ = niqe._aggd(jnp.asarray(rng.normal(size=200000), jnp.float32))
  assert abs(float(a1) - 1) < 0.05 and abs(float(a2) - 2) < 0.05
  # One-sided data: NaN (then left out of the covariance, as in BasicSR).
  (a3, _, _), _ = niqe._aggd(jnp.ones((10,), jnp.float32))
  assert np.isnan(float(a3))


# ---------------------------------------------------------------------------- PSNR / SSIM batch


def test_psnr_ssim_batch_matches_per_image_and_hand_values(photo):
  gt = np.stack([photo[:64, :80], photo[64:128, :80]])
  pred = gt.copy()
  pred[0] = np.clip(gt[0].astype(int) + 10, 0, 255)
  pred[1, :, :40] = 255 - pred[1, :, :40]
  p, s = metrics.psnr_ssim_batch(pred, gt)
  for i in range(2):
    assert abs(p[i] - metrics.psnr_y_np(pred[i], gt[i])) < 1e-4
    assert abs(s[i] - metrics.ssim_y_np(pred[i], gt[i])) < 1e-5
  # Border crop = scoring the cropped images.
  p4, s4 = metrics.psnr_ssim_batch(pred, gt, crop_border=4)
  assert abs(p4[1] - metrics.psnr_y_np(pred[1, 4:-4, 4:-4], gt[1, 4:-4, 4:-4])) < 1e-4
  assert abs(s4[1] - metrics.ssim_y_np(pred[1, 4:-4, 4:-4], gt[1, 4:-4, 4:-4])) < 1e-5
  # Hand value: a constant +10 offset of a flat grey image.
  flat = np.full((1, 16, 16, 3), 100, np.uint8)
  dy = 10 / 255 * (65.481 + 128.553 + 24.966) / 255
  assert abs(metrics.psnr_ssim_batch(flat + np.uint8(10), flat)[0][0]
             - 10 * np.log10(1 / dy**2)) < 1e-4
  with pytest.raises(ValueError, match="uint8"):
    metrics.psnr_ssim_batch(pred.astype(np.float32), gt)


# ------------------------------------------------------------- LPIPS / DISTS parity (torchmetrics)


def _torch_refs():
  """torchmetrics' LPIPS and DISTS modules with torchvision-layout random backbones.

  torchvision (whose PyPI wheel needs CUDA torch) is replaced by a stand-in whose ``alexnet`` /
  ``vgg16`` return the torchvision ``features`` layouts, randomly initialised.
  """
  torch = pytest.importorskip("torch")
  tm_lpips = pytest.importorskip("torchmetrics.functional.image.lpips")
  tm_dists = pytest.importorskip("torchmetrics.functional.image.dists")
  tnn = torch.nn

  def alexnet_features():
    return tnn.Sequential(
        tnn.Conv2d(3, 64, 11, 4, 2), tnn.ReLU(True), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(64, 192, 5, padding=2), tnn.ReLU(True), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(192, 384, 3, padding=1), tnn.ReLU(True),
        tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(True),
        tnn.Conv2d(256, 256, 3, padding=1), tnn.ReLU(True), tnn.MaxPool2d(3, 2))

  def vgg16_features():
    layers, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]:
      if v == "M":
        layers.append(tnn.MaxPool2d(2, 2))
      else:
        layers += [tnn.Conv2d(c, v, 3, padding=1), tnn.ReLU(True)]
        c = v
    return tnn.Sequential(*layers)

  class Net(tnn.Module):
    def __init__(self, features):
      super().__init__()
      self.features = features

  models = types.SimpleNamespace(alexnet=lambda weights=None: Net(alexnet_features()),
                                 vgg16=lambda weights=None: Net(vgg16_features()),
                                 VGG16_Weights=types.SimpleNamespace(DEFAULT=None))
  return torch, tm_lpips, tm_dists, models


def _pair(size=64, seed=0):
  rng = np.random.default_rng(seed)
  a = skdata.astronaut()[100:100 + size, 150:150 + size]
  b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
  return np.stack([a, b]), np.stack([b, a[::-1]])


def test_lpips_matches_torchmetrics(monkeypatch):
  torch, tm_lpips, _, models = _torch_refs()
  from mmsr_jax.evaluation import lpips
  monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
  monkeypatch.setattr(tm_lpips, "_TORCHVISION_AVAILABLE", True)
  for net, size in (("alex", 64), ("vgg", 32)):
    a, b = _pair(size)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (a, b))
    torch.manual_seed(0)
    ref_model = tm_lpips._LPIPS(pretrained=True, net=net, pnet_rand=True).eval()  # wheel heads
    with torch.no_grad():
      want = ref_model(ta, tb, normalize=True).reshape(-1).numpy()
    sd = {k.replace("net.slice1.", "features.").replace("net.slice2.", "features.")
          .replace("net.slice3.", "features.").replace("net.slice4.", "features.")
          .replace("net.slice5.", "features."): v.numpy()
          for k, v in ref_model.state_dict().items()}
    params = metric_nets.lpips_from_torch(sd, net)
    got = np.asarray(lpips.lpips_from_uint8(params, jnp.asarray(a), jnp.asarray(b), net=net))
    assert want.min() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_dists_matches_torchmetrics(monkeypatch):
  torch, _, tm_dists, models = _torch_refs()
  from mmsr_jax.evaluation import dists
  monkeypatch.setattr(tm_dists, "_TORCHVISION_AVAILABLE", True)
  monkeypatch.setattr(tm_dists, "vgg16", models.vgg16, raising=False)
  monkeypatch.setattr(tm_dists, "VGG16_Weights", models.VGG16_Weights, raising=False)
  a, b = _pair(32, seed=1)
  ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (a, b))
  torch.manual_seed(0)
  ref_model = tm_dists.DISTSNetwork(load_weights=True).eval()  # alpha / beta from the wheel
  with torch.no_grad():
    want = ref_model(ta, tb).reshape(-1).numpy()
  sd = {("features." + k.split(".", 1)[1] if k.startswith("stage") else k): v.numpy()
        for k, v in ref_model.state_dict().items()}
  params = metric_nets.dists_from_torch(sd)
  got = np.asarray(dists.dists_from_uint8(params, jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Identical images: distance 0.
  same = np.asarray(dists.dists_from_uint8(params, jnp.asarray(a), jnp.asarray(a)))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_weight_converter_reads_pth_safely_and_refuses_overwrite(tmp_path):
  torch = pytest.importorskip("torch")
  from mmsr_jax.evaluation import lpips
  rng = np.random.default_rng(0)
  sd = {}
  for layer in lpips.ALEXNET:
    if layer[0] == "conv":
      _, idx, ch, k, _, _ = layer
      cin = {0: 3, 3: 64, 6: 192, 8: 384, 10: 256}[idx]
      sd[f"features.{idx}.weight"] = rng.normal(size=(ch, cin, k, k)).astype(np.float32)
      sd[f"features.{idx}.bias"] = rng.normal(size=(ch,)).astype(np.float32)
  heads = {f"lin{k}.model.1.weight": rng.uniform(size=(1, c, 1, 1)).astype(np.float32)
           for k, c in enumerate(lpips.CHANNELS["alex"])}
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "alexnet.pth")
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "alex_heads.pth")
  params = metric_nets.convert("lpips_alex", str(tmp_path / "alexnet.pth"),
                                  str(tmp_path / "alex_heads.pth"))
  np.testing.assert_array_equal(params["params"]["net"]["features_3"]["kernel"],
                                sd["features.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["params"]["lin2"], heads["lin2.model.1.weight"].ravel())
  out = tmp_path / "w" / "lpips_alex.safetensors"
  params_io.save_params(str(out), params)
  loaded = params_io.load_params(str(out), lpips.abstract_params("alex"))
  np.testing.assert_array_equal(loaded["params"]["lin4"], params["params"]["lin4"])
  # Transposed (strided) kernels survive the safetensors round trip.
  np.testing.assert_array_equal(loaded["params"]["net"]["features_3"]["kernel"],
                                sd["features.3.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(FileExistsError):
    params_io.save_params(str(out), params)
  bad = dict(sd)
  del bad["features.8.bias"]
  with pytest.raises(ValueError, match="features.8.bias"):
    metric_nets.lpips_from_torch({**bad, **heads}, "alex")


# ------------------------------------------------------------------------------- evaluate CLI


def _write(path, img):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """pred/gt/lr folders: two 96x192 pairs (NIQE's minimum of two blocks) and one 48x64 pair (too
  small for NIQE)."""
  root = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  src = skdata.astronaut()
  crops = {"a": src[0:96, 0:192], "b": src[200:296, 250:442], "c": src[300:348, 50:114]}
  import cv2
  for name, gt in crops.items():
    h, w = gt.shape[:2]
    lr = cv2.resize(gt, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    pred = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    _write(str(root / "gt" / f"{name}.png"), gt)
    _write(str(root / "lr" / f"{name}.png"), lr)
    _write(str(root / "pred" / f"{name}.png"), pred)
  (root / "pred" / "notes.txt").write_text("not an image, ignored")
  return root


def test_evaluate_api_scores_and_structure(folders, tmp_path):
  logs = []
  res = quality.evaluate(str(folders / "pred"), str(folders / "gt"), str(folders / "lr"),
                        weights_dir=str(tmp_path / "none"), batch_size=2, log=logs.append)
  assert [r["name"] for r in res["per_image"]] == ["a", "b", "c"]
  assert res["metrics"] == ["psnr", "ssim", "niqe"]
  assert set(res["skipped"]) == {"lpips", "lpips_vgg", "dists", "fid"}
  assert any("lpips_alex.safetensors" in line and "mmsr_jax.metric_weights" in line
             for line in logs)
  assert any("fid_inception_v3.safetensors" in line and "pytorch-fid" in line for line in logs)
  for r in res["per_image"]:
    pred = np.asarray(Image.open(folders / "pred" / f"{r['name']}.png"))
    gt = np.asarray(Image.open(folders / "gt" / f"{r['name']}.png"))
    assert abs(r["psnr"] - metrics.psnr_y_np(pred, gt)) < 1e-4
    assert abs(r["ssim"] - metrics.ssim_y_np(pred, gt)) < 1e-5
  assert res["per_image"][2]["niqe"] is None  # 48x64: no whole block
  niqe_ab = niqe.niqe(np.stack([np.asarray(Image.open(folders / "pred" / f"{n}.png"))
                                for n in "ab"]))
  np.testing.assert_allclose([r["niqe"] for r in res["per_image"][:2]], niqe_ab, rtol=1e-6)
  assert abs(res["mean"]["niqe"] - niqe_ab.mean()) < 1e-6
  assert abs(res["mean"]["psnr"] - np.mean([r["psnr"] for r in res["per_image"]])) < 1e-9
  bic = res["baselines"]["bicubic"]
  gt_b = np.asarray(Image.open(folders / "gt" / "b.png"))
  lr_b = np.asarray(Image.open(folders / "lr" / "b.png"))
  up = quality.bicubic(lr_b, gt_b.shape[:2])
  assert abs(bic["per_image"][1]["psnr"] - metrics.psnr_y_np(up, gt_b)) < 1e-4
  table = quality.markdown_table(res)
  assert table.splitlines()[0] == "| method | PSNR↑ | SSIM↑ | NIQE↓ |"
  assert table.splitlines()[2].startswith(f"| ours | {res['mean']['psnr']:.4f} |")
  assert table.splitlines()[3].startswith("| bicubic |")


def test_evaluate_with_learned_metric_weights(folders, tmp_path):
  from mmsr_jax.evaluation import dists, lpips
  wdir = tmp_path / "w"
  x = jnp.zeros((1, 32, 32, 3))
  lp = jax.jit(lpips.LPIPS("alex").init)(jax.random.key(0), x, x)
  params_io.save_params(str(wdir / "lpips_alex.safetensors"), lp)
  res = quality.evaluate(str(folders / "pred"), str(folders / "gt"), weights_dir=str(wdir),
                        learned_metrics=("lpips", "dists"), batch_size=3, log=lambda s: None)
  assert res["metrics"] == ["psnr", "ssim", "lpips", "niqe"]
  assert list(res["skipped"]) == ["dists"]
  pred = np.asarray(Image.open(folders / "pred" / "c.png"))[None]
  gt = np.asarray(Image.open(folders / "gt" / "c.png"))[None]
  want = float(lpips.lpips_from_uint8(lp, jnp.asarray(pred), jnp.asarray(gt), net="alex")[0])
  assert want > 0 and abs(res["per_image"][2]["lpips"] - want) < 1e-6
  del dists


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_outputs_and_errors(folders, tmp_path):
  out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
  r = _run("mmsr_jax.evaluate", f"--pred={folders}/pred", f"--gt={folders}/gt",
           f"--lr={folders}/lr", f"--json={out_json}", f"--csv={out_csv}",
           f"--weights_dir={tmp_path}/none", "--crop-border=4")
  assert r.returncode == 0, r.stderr
  assert "| method | PSNR↑ | SSIM↑ | NIQE↓ |" in r.stdout
  res = json.load(open(out_json))
  assert set(res["mean"]) == {"psnr", "ssim", "niqe"} and len(res["per_image"]) == 3
  assert res["settings"]["crop_border"] == 4
  pred = np.asarray(Image.open(folders / "pred" / "a.png"))
  gt = np.asarray(Image.open(folders / "gt" / "a.png"))
  assert abs(res["per_image"][0]["psnr"] - metrics.psnr_y_np(pred[4:-4, 4:-4], gt[4:-4, 4:-4])) \
      < 1e-4
  rows = list(csv.DictReader(open(out_csv)))
  assert [(x["method"], x["name"]) for x in rows][:4] == [("ours", "a"), ("ours", "b"),
                                                          ("ours", "c"), ("bicubic", "a")]
  assert rows[2]["niqe"] == ""
  # Existing output is not replaced.
  r = _run("mmsr_jax.evaluate", f"--pred={folders}/pred", f"--gt={folders}/gt",
           f"--json={out_json}")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: {out_json} exists; pass --overwrite to replace it"]
  # A prediction without ground truth, and a size mismatch: one line naming the file.
  bad = tmp_path / "bad_pred"
  for n in "abc":
    _write(str(bad / f"{n}.png"), np.asarray(Image.open(folders / "pred" / f"{n}.png")))
  _write(str(bad / "extra.png"), np.zeros((8, 8, 3), np.uint8))
  r = _run("mmsr_jax.evaluate", f"--pred={bad}", f"--gt={folders}/gt")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "extra.png: no ground truth named extra.*" in r.stderr
  os.remove(bad / "extra.png")
  _write(str(bad / "b.png"), np.zeros((100, 192, 3), np.uint8))
  with pytest.raises(ValueError, match=r"b.png: size 100x192 but its ground truth .* 96x192"):
    quality.match_pairs(str(bad), str(folders / "gt"))
  os.remove(bad / "a.png")
  with pytest.raises(FileNotFoundError, match=r"a.png: no prediction named a.\*"):
    quality.match_pairs(str(bad), str(folders / "gt"))


def test_bit_depth_comes_from_the_file_not_its_values(tmp_path):
  """A dark 16-bit grey PNG (every value <= 255) is 16-bit: scored against its own 8-bit
  version it is nearly identical (it was read as a bright 8-bit image once: PSNR 1.3)."""
  rng = np.random.default_rng(0)
  gt16 = rng.integers(0, 256, (32, 40), dtype=np.uint16)  # dark: max <= 255 of 65535
  pred8 = np.round(gt16 / 257.0).astype(np.uint8)  # the same picture at 8 bits (0 or 1)
  _write(str(tmp_path / "gt" / "a.png"), gt16)
  _write(str(tmp_path / "pred" / "a.png"), pred8)
  with Image.open(tmp_path / "gt" / "a.png") as im:
    assert im.mode == "I;16"
  np.testing.assert_array_equal(quality.read_rgb(str(tmp_path / "gt" / "a.png")),
                                np.repeat(pred8[..., None], 3, -1))
  res = quality.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), learned_metrics=(),
                        log=lambda s: None)
  assert res["per_image"][0]["psnr"] == math.inf and res["warnings"] == []


def test_grey_against_colour_is_a_loud_warning(tmp_path):
  gt = skdata.astronaut()[:48, :64]
  grey = np.asarray(Image.fromarray(gt).convert("L"))
  _write(str(tmp_path / "gt" / "a.png"), gt)
  _write(str(tmp_path / "gt" / "b.png"), gt)
  _write(str(tmp_path / "pred" / "a.png"), grey)  # grey prediction, colour ground truth
  _write(str(tmp_path / "pred" / "b.png"), gt)
  out = tmp_path / "r.json"
  r = _run("mmsr_jax.evaluate", f"--pred={tmp_path}/pred", f"--gt={tmp_path}/gt",
           f"--json={out}", "--learned=")
  assert r.returncode == 0, r.stderr
  res = json.load(open(out))
  assert len(res["warnings"]) == 1 and res["warnings"][0].startswith("a: grey prediction")
  assert "colour ground truth" in res["per_image"][0]["warning"]
  assert "warning" not in res["per_image"][1]
  assert "**WARNING**: 1 of 2 pairs mix a grey and a colour image" in r.stdout
  assert "- a: grey prediction" in r.stdout


def test_truncated_image_is_one_line_naming_it(tmp_path):
  gt = skdata.astronaut()[:48, :64]
  _write(str(tmp_path / "gt" / "a.png"), gt)
  _write(str(tmp_path / "pred" / "a.png"), gt)
  data = (tmp_path / "gt" / "a.png").read_bytes()
  (tmp_path / "gt" / "a.png").write_bytes(data[: len(data) // 2])
  r = _run("mmsr_jax.evaluate", f"--pred={tmp_path}/pred", f"--gt={tmp_path}/gt", "--learned=")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0].startswith(f"error: {tmp_path / 'gt' / 'a.png'}: not a readable image"), lines


# ------------------------------------------------------------------------------ benchmark mode


def test_benchmark_mode_end_to_end(tmp_path):
  config = small_config(**{"num_train_steps": 1, "checkpoint_every": 1, "log_every": 1,
                           "sampling.steps": 2, "sampling.strength": 1.0})
  workdir = str(tmp_path / "run")
  sr_task.train(config, workdir, devices=jax.devices()[:1], write_report=False)
  bench = tmp_path / "bench"
  src = skdata.astronaut()
  import cv2
  for i, (y, x) in enumerate([(0, 0), (200, 240)]):
    gt = src[y:y + 48, x:x + 64]
    _write(str(bench / "test_HR" / f"img{i}.png"), gt)
    _write(str(bench / "test_LR" / f"img{i}.png"),
           cv2.resize(gt, (16, 12), interpolation=cv2.INTER_AREA))
  out = tmp_path / "out"
  res = quality.run_and_score(str(bench), workdir, str(out), log=lambda s: None,
                             weights_dir=str(tmp_path / "none"))
  assert sorted(os.listdir(out)) == ["img0.png", "img1.png"]
  for r in res["per_image"]:
    sr = np.asarray(Image.open(out / f"{r['name']}.png"))
    gt = np.asarray(Image.open(bench / "test_HR" / f"{r['name']}.png"))
    assert sr.shape == gt.shape == (48, 64, 3)
    assert abs(r["psnr"] - metrics.psnr_y_np(sr, gt)) < 1e-4
    assert r["niqe"] is None
  assert set(res["baselines"]) == {"bicubic"} and res["benchmark"]["sr_seconds"] > 0
  # Outputs exist now: a second run refuses before loading the model.
  with pytest.raises(FileExistsError, match="img0.png exists"):
    quality.run_and_score(str(bench), workdir, str(out), log=lambda s: None)
  with pytest.raises(NotADirectoryError, match="test_LR"):
    quality.run_and_score(str(tmp_path), workdir, str(tmp_path / "o2"))


# ------------------------------------------------------------------------------------------ FID


def _torch_fid_inception():
  """A PyTorch FID Inception-v3 with pytorch-fid's layout and state-dict names, written here from
  torch primitives (pytorch-fid itself needs torchvision, whose PyPI wheel needs CUDA torch):
  torchvision's Inception-v3 blocks, pool branches without padding in the average, max pool in
  Mixed_7c, bilinear resize to 299 (align_corners=False), input mapped to [-1, 1]."""
  torch = pytest.importorskip("torch")
  tnn, F = torch.nn, torch.nn.functional

  class BC(tnn.Module):
    def __init__(self, i, o, k, st=1, p=0):
      super().__init__()
      self.conv = tnn.Conv2d(i, o, k, st, p, bias=False)
      self.bn = tnn.BatchNorm2d(o, eps=1e-3)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  def chain(m, x, *names):
    for n in names:
      x = getattr(m, n)(x)
    return x

  class A(tnn.Module):
    def __init__(self, i, pf):
      super().__init__()
      self.branch1x1, self.branch5x5_1, self.branch5x5_2 = BC(i, 64, 1), BC(i, 48, 1), BC(
          48, 64, 5, p=2)
      self.branch3x3dbl_1, self.branch3x3dbl_2 = BC(i, 64, 1), BC(64, 96, 3, p=1)
      self.branch3x3dbl_3, self.branch_pool = BC(96, 96, 3, p=1), BC(i, pf, 1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), chain(self, x, "branch5x5_1", "branch5x5_2"),
                        chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                        self.branch_pool(avg(x))], 1)

  class B(tnn.Module):
    def __init__(self, i):
      super().__init__()
      self.branch3x3, self.branch3x3dbl_1 = BC(i, 384, 3, 2), BC(i, 64, 1)
      self.branch3x3dbl_2, self.branch3x3dbl_3 = BC(64, 96, 3, p=1), BC(96, 96, 3, 2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x),
                        chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                        F.max_pool2d(x, 3, 2)], 1)

  class C(tnn.Module):
    def __init__(self, i, c):
      super().__init__()
      r, q = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))
      self.branch1x1, self.branch7x7_1 = BC(i, 192, 1), BC(i, c, 1)
      self.branch7x7_2, self.branch7x7_3 = BC(c, c, **r), BC(c, 192, **q)
      self.branch7x7dbl_1, self.branch7x7dbl_2 = BC(i, c, 1), BC(c, c, **q)
      self.branch7x7dbl_3, self.branch7x7dbl_4 = BC(c, c, **r), BC(c, c, **q)
      self.branch7x7dbl_5, self.branch_pool = BC(c, 192, **r), BC(i, 192, 1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x),
                        chain(self, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                        chain(self, x, *(f"branch7x7dbl_{j}" for j in range(1, 6))),
                        self.branch_pool(avg(x))], 1)

  class D(tnn.Module):
    def __init__(self, i):
      super().__init__()
      self.branch3x3_1, self.branch3x3_2 = BC(i, 192, 1), BC(192, 320, 3, 2)
      self.branch7x7x3_1, self.branch7x7x3_2 = BC(i, 192, 1), BC(192, 192, (1, 7), p=(0, 3))
      self.branch7x7x3_3, self.branch7x7x3_4 = BC(192, 192, (7, 1), p=(3, 0)), BC(192, 192, 3, 2)

    def forward(self, x):
      return torch.cat([chain(self, x, "branch3x3_1", "branch3x3_2"),
                        chain(self, x, *(f"branch7x7x3_{j}" for j in range(1, 5))),
                        F.max_pool2d(x, 3, 2)], 1)

  class E(tnn.Module):
    def __init__(self, i, maxp):
      super().__init__()
      self.maxp = maxp
      self.branch1x1, self.branch3x3_1 = BC(i, 320, 1), BC(i, 384, 1)
      self.branch3x3_2a = BC(384, 384, (1, 3), p=(0, 1))
      self.branch3x3_2b = BC(384, 384, (3, 1), p=(1, 0))
      self.branch3x3dbl_1, self.branch3x3dbl_2 = BC(i, 448, 1), BC(448, 384, 3, p=1)
      self.branch3x3dbl_3a = BC(384, 384, (1, 3), p=(0, 1))
      self.branch3x3dbl_3b = BC(384, 384, (3, 1), p=(1, 0))
      self.branch_pool = BC(i, 192, 1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2")
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      bp = F.max_pool2d(x, 3, 1, 1) if self.maxp else avg(x)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], 1)

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BC(3, 32, 3, 2), BC(32, 32, 3)
      self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BC(32, 64, 3, p=1), BC(64, 80, 1)
      self.Conv2d_4a_3x3 = BC(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)

    def forward(self, x):
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
      x = F.max_pool2d(chain(self, x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), 3, 2)
      x = F.max_pool2d(chain(self, x, "Conv2d_3b_1x1", "Conv2d_4a_3x3"), 3, 2)
      x = chain(self, x, "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
      return x.mean((2, 3))

  torch.manual_seed(0)
  net = Net().eval()
  g = torch.Generator().manual_seed(1)
  for m in net.modules():  # non-trivial batch-norm statistics
    if isinstance(m, tnn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5, generator=g)
      m.running_var.uniform_(0.5, 2.0, generator=g)
      m.weight.data.uniform_(0.5, 1.5, generator=g)
      m.bias.data.uniform_(-0.2, 0.2, generator=g)
  return torch, net


def test_fid_inception_parity_and_evaluate(tmp_path):
  from mmsr_jax.evaluation import inception
  torch, net = _torch_fid_inception()
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 40, 56, 3)).astype(np.uint8)
  gts = np.clip(imgs.astype(int) + rng.integers(-50, 50, imgs.shape), 0, 255).astype(np.uint8)
  with torch.no_grad():
    want = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255).numpy()
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  wdir = tmp_path / "w"
  params_io.save_params(str(wdir / "fid_inception_v3.safetensors"), metric_nets.inception_from_torch(sd))
  feats = quality.load_learned(str(wdir), ("fid",), log=print)["fid"]
  got = np.asarray(feats(jnp.asarray(imgs)))
  assert got.shape == (3, 2048)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  # evaluate: FID of the prediction set against the ground-truth set, from the same features.
  for i in range(3):
    _write(str(tmp_path / "pred" / f"{i}.png"), imgs[i])
    _write(str(tmp_path / "gt" / f"{i}.png"), gts[i])
  res = quality.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), weights_dir=str(wdir),
                        learned_metrics=("fid",), log=lambda s: None)
  assert res["metrics"] == ["psnr", "ssim", "niqe", "fid"]
  want_fid = inception.fid_from_features(got, np.asarray(feats(jnp.asarray(gts))))
  assert want_fid > 0 and abs(res["mean"]["fid"] - want_fid) < 1e-6 * want_fid
  assert "fid" not in res["per_image"][0]
  with pytest.raises(ValueError, match="Mixed_7c.branch_pool.bn.running_var"):
    metric_nets.inception_from_torch({k: v for k, v in sd.items()
                             if k != "Mixed_7c.branch_pool.bn.running_var"})


def test_frechet_distance_against_eigenvalues():
  from mmsr_jax.evaluation import inception
  rng = np.random.default_rng(0)
  f1 = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
  f2 = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 6)) + 0.5
  m1, m2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  # Tr((S1 S2)^(1/2)) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2.
  ev = np.linalg.eigvals(s1 @ s2)
  want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev.real))
  assert abs(inception.fid_from_features(f1, f2) - want) < 1e-8 * want
  assert abs(inception.frechet_distance(m1, s1, m1, s1)) < 1e-8
  # Hand value in one dimension: (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
  assert abs(inception.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-12
  with pytest.raises(ValueError, match="at least two"):
    inception.fid_from_features(f1[:1], f2)
