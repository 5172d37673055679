"""The context experiment's parts: edge F1 with a pixel tolerance, the operator segmentation and
depth cue, captions from file names, the VQ tokenizer's photo-folder source, the experiment's
configs, and its evaluation end to end on tiny synthetic photos."""

import json
import os

import cv2
import jax
import numpy as np
import pytest

from mmsr_jax.data import modalities, photo_maps, sources
from mmsr_jax.evaluation import metrics, niqe
from mmsr_jax.schema import tasks
from tests.conftest import apply_overrides


def _lines(shape, pixels):
  m = np.zeros(shape, np.float32)
  for r, c in pixels:
    m[r, c] = 1
  return m


def test_edge_f1_counts_a_line_one_pixel_off_only_within_the_tolerance():
  true = _lines((8, 8), [(r, 3) for r in range(8)])  # a vertical line in column 3
  shifted = _lines((8, 8), [(r, 4) for r in range(8)])  # the same line one pixel right
  exact = metrics.edge_f1(shifted, true, tolerance=0)
  assert float(exact["f1"]) == 0.0
  near = metrics.edge_f1(shifted, true, tolerance=1)
  assert float(near["precision"]) == 1.0 and float(near["recall"]) == 1.0
  # A second, spurious line far away halves the precision; recall stays whole.
  extra = shifted + _lines((8, 8), [(r, 7) for r in range(8)])
  s = metrics.edge_f1(extra, true, tolerance=1)
  assert float(s["precision"]) == pytest.approx(0.5)
  assert float(s["recall"]) == 1.0
  assert float(s["f1"]) == pytest.approx(2 / 3)
  # Counts pool over a batch: a second pair that is all misses lowers both.
  batch = metrics.edge_f1(np.stack([shifted, _lines((8, 8), [(0, 0)])]),
                          np.stack([true, _lines((8, 8), [(7, 7)])]), tolerance=1)
  assert float(batch["precision"]) == pytest.approx(8 / 9)
  assert float(batch["recall"]) == pytest.approx(8 / 9)
  assert float(metrics.edge_f1(np.zeros((8, 8)), true)["f1"]) == 0.0
  with pytest.raises(ValueError):
    metrics.edge_f1(np.zeros((8, 8)), np.zeros((8, 9)))


def test_graph_segmentation_follows_a_colour_boundary():
  img = np.zeros((64, 64, 3), np.uint8)
  img[:, :40] = (200, 30, 30)  # red left, blue right: the boundary is not on a grid line
  img[:, 40:] = (30, 30, 200)
  rng = np.random.default_rng(0)
  noisy = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
  seg = modalities.graph_segmentation(noisy)
  assert len(np.unique(seg[:, :38])) == 1 and len(np.unique(seg[:, 42:])) == 1
  assert seg[0, 0] != seg[0, 63]
  # Labels are colour classes: the same colour gets the same label in another image.
  assert seg[0, 0] == modalities.colour_class(np.array([200, 30, 30]))


def test_haze_depth_puts_the_hazy_part_far():
  img = np.zeros((64, 64, 3), np.uint8)
  img[:32] = (190, 195, 200)  # bright in every channel: haze, far away
  img[32:] = (120, 60, 20)  # one dark channel: a near, saturated object
  d = modalities.haze_depth(img)
  assert d.shape == (64, 64) and d.dtype == np.float32
  assert 0.0 <= d.min() and d.max() <= 1.0
  assert d[:24].mean() > d[40:].mean() + 0.3


def test_operator_maps_from_the_hr_crop_keep_edges_the_lr_loses():
  img = np.zeros((64, 64, 3), np.uint8)
  img[::4] = 255  # stripes 1 pixel wide every 4: gone after x4 downsampling
  hr = modalities.operator_maps(img, 64)
  lr = modalities.operator_maps(cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA), 64)
  assert hr["edge"].sum() > 10 * max(lr["edge"].sum(), 1.0)
  assert set(hr) == set(modalities.MODALITIES) and hr["seg"].dtype == np.int32


def _photos(folder, names, size, seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for n in names:
    img = np.zeros((size, size + 8, 3), np.uint8)
    for _ in range(6):  # a few flat rectangles: edges, regions and brightness to map
      y, x = rng.integers(0, max(1, size - 8), 2)
      hh, ww = rng.integers(4, max(5, size // 2), 2)
      img[y:y + hh, x:x + ww] = rng.integers(0, 256, 3)
    cv2.imwrite(os.path.join(folder, n), img)
  return str(folder)


def test_captions_from_file_names(tmp_path):
  folder = _photos(tmp_path / "p", ["abbey_sun_xyz.png", "building_facade_sun_q.png",
                                    "other.png", "lake_sun_z.png"], 16)
  with open(os.path.join(folder, "lake_sun_z.txt"), "w") as f:
    f.write("a lake  at dusk\n")  # a sidecar caption wins over the name
  src = sources.FolderSource(folder, caption_from_name=r"^(.+?)_sun_")
  caps = {os.path.basename(p): src[i]["caption"] for i, p in enumerate(src.files)}
  assert caps == {"abbey_sun_xyz.png": "abbey", "building_facade_sun_q.png": "building facade",
                  "other.png": "", "lake_sun_z.png": "a lake at dusk"}
  assert sources.FolderSource(folder)[0]["caption"] == ""


def test_the_experiment_configs_validate_and_refuse_a_pattern_without_a_group():
  from configs import context_photos, vq_context_photos
  sr, vq = context_photos.get_config(), vq_context_photos.get_config()
  tasks.validate(sr)
  tasks.validate(vq)
  # The SR model reads the tokenizer's ids: one architecture, one map size, 16x16 ids.
  assert sr.vq.arch.to_dict() == vq.vq.arch.to_dict()
  assert sr.data.map_size == vq.data.map_size == sr.data.hr_size == vq.vq_train.crop_size
  assert sr.data.map_size // 2 ** (len(sr.vq.arch.block_out_channels) - 1) == 16
  sr.data.caption_from_name = "^no_group_"
  with pytest.raises(ValueError, match="caption_from_name"):
    tasks.validate(sr)
  vq.vq_train.eval_path = ""
  with pytest.raises(ValueError, match="eval_path"):
    tasks.validate(vq)


def test_vq_folder_source_makes_operator_maps_of_crops(tmp_path):
  from configs import vq_context_photos
  train = _photos(tmp_path / "train", [f"a{i}_sun_x.png" for i in range(3)], 40)
  held = _photos(tmp_path / "held", ["h0.png", "h1.png"], 40, seed=1)
  c = apply_overrides(vq_context_photos.get_config(), {
      "data.map_size": 32, "vq_train.crop_size": 32, "vq_train.path": train,
      "vq_train.eval_path": held, "vq_train.eval_crops": 3, "vq_train.lr_fraction": 0.5})
  t = photo_maps.transform(c)
  rec = photo_maps.train_source(c)[0]
  a = t.random_map(rec, np.random.default_rng(5))
  b = t.random_map(rec, np.random.default_rng(5))
  assert a["maps"].shape == (3, 32, 32, 3) and a["present"].all()
  np.testing.assert_array_equal(a["maps"], b["maps"])  # a pure function of the record's rng
  assert -1.0 <= a["maps"].min() and a["maps"].max() <= 1.0
  held_maps = photo_maps.heldout_maps(c)
  assert set(held_maps) == set(modalities.MODALITIES)
  assert held_maps["edge"]["maps"].shape == (6, 32, 32, 3)
  # The first crop of each photo is its centre: the HR crop's own Canny edges.
  img = sources.FolderSource(held)[0]["image"]
  centre = img[4:36, 8:40]
  want = modalities.render_map("edge", modalities.canny(centre), 32)
  np.testing.assert_array_equal(held_maps["edge"]["maps"][0], want)


def test_pooled_niqe_needs_two_blocks_in_the_set():
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (2, 100, 100, 3)).astype(np.uint8)
  assert np.isfinite(niqe.pooled_niqe(imgs))
  with pytest.raises(ValueError, match="two"):
    niqe.pooled_niqe(imgs[:1])


def _tiny_context_config(train, held, maps_from, seed):
  from configs import context_photos
  c = context_photos.get_config()
  return apply_overrides(c, {
      "seed": seed, "batch_size": 4, "num_train_steps": 2, "log_every": 1,
      "checkpoint_every": 2, "optimizer.warmup_steps": 1,
      "data.path": train, "data.eval_path": held, "data.maps_from": maps_from,
      "data.hr_size": 48, "data.eval_size": 48, "data.map_size": 24, "text.max_length": 16,
      "vq.params": "", "vq.arch.block_out_channels": (8, 16, 16), "vq.arch.latent_channels": 8,
      "vq.arch.vq_embed_dim": 8, "vq.arch.num_vq_embeddings": 32,
      "model.width": 32, "model.depth": 1, "model.num_heads": 2, "model.context_latents": 4,
      "model.context_depth": 1, "model.context_heads": 2, "sampling.steps": 4,
      "eval.steps": 2})


def test_context_study_end_to_end(tmp_path):
  from mmsr_jax.training import context_ablation as context_study, sr_task
  train = _photos(tmp_path / "train", [f"scene{i}_sun_x.png" for i in range(3)], 64)
  held = _photos(tmp_path / "held", ["h0.png", "h1.png"], 100, seed=1)
  runs = []
  for maps_from in ("hr", "lr"):
    wd = str(tmp_path / f"run_{maps_from}")
    cfg = _tiny_context_config(train, held, maps_from, 0)
    tasks.validate(cfg)
    sr_task.train(cfg, wd, devices=jax.devices()[:1], write_report=False)
    runs.append(wd)
  out, fig = str(tmp_path / "study"), str(tmp_path / "fig.png")
  report = context_study.run_study(runs, out, images=2, paper_steps=2, figure_path=fig,
                                   log=lambda _: None)
  saved = json.load(open(os.path.join(out, "context_study.json")))
  assert saved["gaps"] == json.loads(json.dumps(report["gaps"]))
  for src in ("hr", "lr"):
    agg = saved["aggregate"][src]
    assert set(agg["x0"]) == set(context_study.SETTINGS)
    assert np.isfinite(agg["x0"]["all"]["x0_mse_tmax"]["mean"])
    for sampler in ("paper", "fidelity"):
      sc = agg[sampler]["no_context"]
      assert {"psnr", "ssim", "edge_f1", "niqe_pooled"} <= set(sc)
      assert sc["psnr"]["n"] == 1 and sc["psnr"]["std"] == 0.0
  run = saved["runs"][0]
  assert run["heldout_photos"] == 2 and run["heldout_tiles"] == 8
  assert run["captions_present"] == 0  # the held-out photos have no captions
  table = open(os.path.join(out, "table.md")).read()
  assert table.count("| hr | ") == len(context_study.SETTINGS) + 1
  # bicubic | no context | LR maps | oracle maps | HR, one row per sampled photo (96 px each).
  img = cv2.imread(fig)  # a palette PNG, read back as BGR
  assert img.shape == (2 * 96 + 4, 5 * 96 + 4 * 4, 3)
  with pytest.raises(ValueError, match="overwrite"):
    context_study.run_study(runs, out, images=2, paper_steps=2)
  # Each run's evaluation is kept: a second call reads it back instead of sampling again.
  logs = []
  again = context_study.run_study(runs, out, images=2, paper_steps=2, overwrite=True,
                                  log=logs.append)
  assert sum("read from" in m for m in logs) == 2
  assert again["aggregate"] == report["aggregate"]
  # The x0 error by checkpoint: one row per kept checkpoint (steps 2 of each run), then read back.
  rows = context_study.x0_by_step(runs, str(tmp_path / "x0"), log=lambda _: None)["rows"]
  assert [(r["maps_from"], r["step"]) for r in rows] == [("hr", 2), ("lr", 2)]
  assert all(np.isclose(r["gap"], r["no_context"] - r["all"]) for r in rows)
  assert os.path.getsize(str(tmp_path / "x0" / "x0_by_step.png")) > 0
  again = context_study.x0_by_step(runs, str(tmp_path / "x0"), overwrite=True,
                                   log=lambda m: pytest.fail(f"evaluated again: {m}"))
  assert again["rows"] == rows
  # How much each run depends on its context, beside the x0 error of predicting 0.
  sens = context_study.context_sensitivity(runs, str(tmp_path / "sens"), photos=1,
                                           log=lambda _: None)
  assert [r["maps_from"] for r in sens] == ["hr", "lr"] and sens[0]["tiles"] == 4
  for r in sens:
    assert r["context_change_nulled"] > 0 and len(r["output_change"]) == 3
    assert np.isfinite(r["x0_zero_predictor"]) and r["x0_zero_predictor"] > 0
    assert set(r["x0_mse_tmax"]) == {"all", "no_context"}
  with pytest.raises(ValueError, match="overwrite"):
    context_study.context_sensitivity(runs, str(tmp_path / "sens"), photos=1)
  with pytest.raises(ValueError, match="one run per"):
    context_study.run_study([runs[0], runs[0]], str(tmp_path / "again"), images=1,
                            paper_steps=1)
