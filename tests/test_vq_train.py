"""VQ tokenizer training (mmsr_jax.train_vq, mmsr_jax.training.vq_losses) and shard tokenization
(python -m mmsr_jax.precompute, mmsr_jax.training.encoder_pass): straight-through gradients,
hand-computed VQ terms, EMA codebook update, dead-code restart, a short train that raises
codebook usage and lowers the reconstruction error, exact resume through the shared loop, and
tokenize -> decode through ArrayRecord shards."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.schema import tasks
from tests.conftest import small_config
from mmsr_jax.training import vq_losses as L
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.training import encoder_pass
from mmsr_jax.training import sr_task
from mmsr_jax.training import vq_task
from mmsr_jax.training import vq_report
from mmsr_jax.data import vq_examples
from mmsr_jax.data import synthetic
from mmsr_jax.data import crops, sr_examples
from mmsr_jax.models import build
from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.system import frozen_params
from mmsr_jax.formats.records import SHARD_PATTERN, decode_record, encode_record, read_crop_bank, read_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "mmsr_jax", "assets", "vq_tiny.safetensors")


def micro_config(**overrides):
  """A VQGAN small enough that a train step compiles and runs in about a second on CPU."""
  from configs import vq_tiny
  from tests.conftest import apply_overrides
  c = vq_tiny.get_config()
  c.batch_size = 8
  c.num_train_steps = 30
  c.log_every = 5
  c.checkpoint_every = 15
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 2
  c.data.map_size = 16
  c.vq.arch = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                   latent_channels=8, num_vq_embeddings=32, vq_embed_dim=8, norm_num_groups=4,
                   mid_block_attention=False)
  c.vq_train.source = "synthetic"
  c.vq_train.restart_every = 5
  c.vq_train.restart_threshold = 1.0
  c.vq_train.eval_synthetic = 4
  c.vq_train.png_examples = 2
  return apply_overrides(c, overrides)


# ------------------------------------------------------------------------------- loss terms
def test_quantize_terms_on_a_hand_made_example():
  codebook = jnp.array([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
  z = jnp.array([[[0.2, 0.1], [0.9, 1.3], [2.0, 0.0]]])  # [1, 3 tokens, D=2]
  z_st, ids, terms = L.quantize(z, codebook)
  np.testing.assert_array_equal(ids, [[0, 1, 2]])  # [2, 0]: 1.0 to code 2, 2.0 to code 1
  np.testing.assert_allclose(z_st, codebook[jnp.array([[0, 1, 2]])], atol=0)
  # Squared distances to the chosen codes: 0.05, 0.10, 1.00; mean over 3 tokens x 2 channels.
  assert float(terms["commitment"]) == pytest.approx(1.15 / 6, abs=1e-6)
  assert float(terms["codebook"]) == pytest.approx(1.15 / 6, abs=1e-6)
  # Token weights: the third token (weight 0) drops out of both means.
  _, _, wt = L.quantize(z, codebook, jnp.array([[1.0, 1.0, 0.0]]))
  assert float(wt["commitment"]) == pytest.approx(0.15 / 4, abs=1e-6)
  # Gradients: commitment reaches z only, the codebook term reaches the chosen codes only.
  g_z = jax.grad(lambda z: L.quantize(z, codebook)[2]["commitment"])(z)
  np.testing.assert_allclose(g_z, 2 * (z - codebook[jnp.array([[0, 1, 2]])]) / 6, atol=1e-6)
  assert float(jnp.abs(jax.grad(lambda e: L.quantize(z, e)[2]["commitment"])(codebook)).max()) == 0
  g_e = jax.grad(lambda e: L.quantize(z, e)[2]["codebook"])(codebook)
  np.testing.assert_allclose(g_e, 2 * (codebook - z[0]) / 6, atol=1e-6)
  # The model's own quantiser (vqgan.VectorQuantizer) gives the same ids and terms.
  vq = vqgan_lib.VectorQuantizer(3, 2)
  _, ids2, aux = vq.apply({"params": {"embedding": {"embedding": codebook}}}, z)
  np.testing.assert_array_equal(ids2, ids)
  assert float(aux["commitment_loss"]) == pytest.approx(float(terms["commitment"]), abs=1e-7)
  assert float(aux["codebook_loss"]) == pytest.approx(float(terms["codebook"]), abs=1e-7)


def test_straight_through_gradient_reaches_the_encoder():
  # The estimator itself: d z_st / d z is the identity.
  codebook = jax.random.normal(jax.random.key(0), (16, 4))
  z = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
  c = jax.random.normal(jax.random.key(2), z.shape)
  g = jax.grad(lambda z: jnp.sum(c * L.quantize(z, codebook)[0]))(z)
  np.testing.assert_allclose(g, c, atol=1e-6)
  # Through the VQGAN: a reconstruction loss after quantisation has non-zero, finite gradients
  # on every encoder parameter.
  cfg = vqgan_lib.VQGANConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=8,
                              num_vq_embeddings=16, vq_embed_dim=8, norm_num_groups=4,
                              mid_block_attention=False)
  model = vqgan_lib.VQGAN(cfg)
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(4), x)["params"]

  def loss(p):
    z = model.apply({"params": p}, x, method=vqgan_lib.VQGAN.encode)
    z_st, _, terms = L.quantize(z, p["quantize"]["embedding"]["embedding"])
    rec = model.apply({"params": p}, z_st, method=vqgan_lib.VQGAN.decode)
    return L.reconstruction(x, rec, "l1")

  grads = jax.jit(jax.grad(loss))(params)  # one compile, not one per operation
  for path, g in jax.tree_util.tree_leaves_with_path(grads["encoder"]):
    assert np.isfinite(g).all(), jax.tree_util.keystr(path)
  enc_norm = float(L.tree_l2(grads["encoder"]))
  assert enc_norm > 1e-6
  # Without the straight-through trick (z_q used as a constant) the encoder gets nothing.
  def loss_no_st(p):
    z = model.apply({"params": p}, x, method=vqgan_lib.VQGAN.encode)
    ids = L.nearest_codes(z, p["quantize"]["embedding"]["embedding"])
    rec = model.apply({"params": p}, ids, method=vqgan_lib.VQGAN.decode_ids)
    return L.reconstruction(x, rec, "l1")
  assert float(L.tree_l2(jax.jit(jax.grad(loss_no_st))(params)["encoder"])) == 0.0


def test_ema_codebook_update_on_a_hand_made_example():
  cluster = jnp.array([1.0, 1.0])
  embed_sum = jnp.array([[0.0, 0.0], [2.0, 2.0]])
  z = jnp.array([[1.0, 0.0], [3.0, 0.0], [5.0, 5.0]])
  ids = jnp.array([0, 0, 1])
  cs, es, cb = L.ema_codebook_update(cluster, embed_sum, z, ids, None, decay=0.5, eps=0.0)
  np.testing.assert_allclose(cs, [0.5 + 1.0, 0.5 + 0.5])  # counts 2 and 1
  np.testing.assert_allclose(es, [[2.0, 0.0], [1.0 + 2.5, 1.0 + 2.5]])
  np.testing.assert_allclose(cb, [[2.0 / 1.5, 0.0], [3.5, 3.5]], rtol=1e-6)
  # Weight 0 on the last token: code 1 only decays.
  cs, es, _ = L.ema_codebook_update(cluster, embed_sum, z, ids, jnp.array([1.0, 1.0, 0.0]), 0.5)
  np.testing.assert_allclose(cs, [1.5, 0.5])
  np.testing.assert_allclose(es[1], [1.0, 1.0])


def test_dead_code_restart_revives_unused_codes():
  codebook = jnp.array([[0.0, 0.0], [9.0, 9.0], [-9.0, 9.0], [9.0, -9.0]])
  z = jnp.array([[0.1, 0.2], [0.3, -0.1], [-0.2, 0.4], [0.5, 0.5], [0.05, -0.3], [-0.4, -0.2]])
  ids = L.nearest_codes(z, codebook)
  counts = L.code_counts(ids, 4)
  assert float(L.usage_fraction(counts)) == 0.25  # every token picks code 0
  usage = counts  # 6, 0, 0, 0
  new_cb, new_usage, dead = L.restart_dead_codes(codebook, usage, z, None, jax.random.key(0),
                                                 threshold=1.0)
  np.testing.assert_array_equal(dead, [False, True, True, True])
  np.testing.assert_array_equal(new_cb[0], codebook[0])  # the live code is untouched
  for k in (1, 2, 3):  # every revived code sits on one of the batch's encoder outputs
    assert float(jnp.min(jnp.sum(jnp.abs(z - new_cb[k]), -1))) == 0.0
  np.testing.assert_allclose(new_usage, [6.0, 1.0, 1.0, 1.0])
  after = L.code_counts(L.nearest_codes(z, new_cb), 4)
  assert float(L.usage_fraction(after)) > 0.25
  # Only tokens with weight > 0 are candidates.
  w = jnp.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
  new_cb, _, _ = L.restart_dead_codes(codebook, usage, z, w, jax.random.key(1), threshold=1.0)
  for k in (1, 2, 3):
    np.testing.assert_allclose(new_cb[k], z[3])


def test_psnr_and_perplexity():
  x = jnp.zeros((1, 4, 4, 3))
  # Error of 0.1 in [-1, 1] is 0.05 in [0, 1]: PSNR = 10 log10(1 / 0.0025) = 26.0206 dB.
  assert float(L.psnr(x, x + 0.1)[0]) == pytest.approx(26.0206, abs=1e-3)
  assert float(L.perplexity(jnp.array([5.0, 5.0, 0.0, 0.0]))) == pytest.approx(2.0, abs=1e-5)
  assert float(L.perplexity(jnp.array([7.0, 0.0, 0.0]))) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- synthetic maps
def test_synthetic_maps_and_loader_examples():
  rng = np.random.default_rng(0)
  seg = synthetic.synthetic_seg(rng, 32)
  assert seg.dtype == np.int32 and seg.shape == (32, 32) and len(np.unique(seg)) >= 1
  depth = synthetic.synthetic_depth(rng, 32)
  assert depth.min() == pytest.approx(0.0, abs=1e-6) and depth.max() == pytest.approx(1.0, abs=1e-6)
  edge = synthetic.synthetic_edge(rng, 32)
  assert set(np.unique(edge)) <= {0.0, 1.0}
  t = vq_examples.MakeMapsExample(16, 0.0, True)
  ex = t.random_map({}, np.random.default_rng(1))
  assert ex["maps"].shape == (3, 16, 16, 3) and ex["present"].all()
  assert -1.0 <= ex["maps"].min() and ex["maps"].max() <= 1.0
  # A record with an image and depth only: seg is absent unless synthetic maps fill it.
  rec = {"image": np.random.default_rng(2).integers(0, 256, (40, 50, 3), np.uint8),
         "depth": np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)}
  ex = vq_examples.MakeMapsExample(16, 0.0, False).random_map(rec, np.random.default_rng(3))
  np.testing.assert_array_equal(ex["present"], [True, False, True])
  assert np.all(ex["maps"][1] == 0)


# ------------------------------------------------------------------------------ training task
def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_short_train_raises_usage_lowers_error_and_reports(tmp_path):
  # 128 codes for 1536 tokens a step: at initialisation few codes win the nearest-code search.
  config = micro_config(num_train_steps=20, log_every=1, checkpoint_every=20,
                        **{"vq.arch.num_vq_embeddings": 128, "vq_train.restart_every": 4})
  wd = str(tmp_path / "vq")
  state = vq_task.train(config, wd, devices=jax.devices()[:2])
  assert int(state["step"]) == config.num_train_steps
  m = _metrics(wd)
  usage = [r["codebook_usage"] for r in m]
  recon = [r["recon_loss"] for r in m]
  assert np.mean(usage[-3:]) > usage[0] + 0.15, usage
  assert np.mean(recon[-3:]) < 0.8 * recon[0], recon
  assert sum(r["restarted"] for r in m) > 0
  report = json.load(open(os.path.join(wd, "report.json")))
  for key in ("recon_psnr", "continuous_recon_psnr"):
    assert set(report[key]) == {"depth", "seg", "edge"}
    assert all(np.isfinite(v) and v > 5.0 for v in report[key].values()), report[key]
  assert 0.0 < report["codebook_usage"] <= 1.0
  assert 1.0 <= report["perplexity"] <= 128.0
  assert os.path.getsize(os.path.join(wd, "reconstructions.png")) > 0
  grid = vq_task.VQTask(config, wd, devices=jax.devices()[:1]).sample_grid(state)
  # 3 modalities x (maps, VQ, continuous) rows of 2 maps of 16 px, 4 px gaps, enlarged x16.
  assert grid["reconstructions"].shape == (16 * 3 * (3 * 16 + 4), 16 * 32, 3)
  # The exported tokenizer is what config.vq.params loads, and reproduces the report's ids.
  from configs import tiny
  mc = tiny.get_config()
  mc.vq.arch = config.vq.arch.to_dict()
  mc.data.map_size = 16
  mc.vq.params = os.path.join(wd, "vq.safetensors")
  cond = build.conditioner(mc)
  frozen = frozen_params(mc, cond)
  x = jnp.asarray(vq_examples.heldout_maps(config)["depth"]["maps"][:2])
  ids = cond.modality_ids(frozen, jnp.stack([x, x, x], axis=1))
  p = jax.tree.map(lambda a: a[0], jax.device_get(state["params"]["vq"]))
  _, want = vq_report.reconstruct(vqgan_lib.VQGAN(build.vq_arch(config, config.compute_dtype)), p, x)
  np.testing.assert_array_equal(ids[:, 0], want)


@pytest.mark.slow  # the loop's resume is covered by test_train; this checks the VQ task's state
def test_resume_continues_exactly(tmp_path):
  config = micro_config(num_train_steps=6, checkpoint_every=3, log_every=3,
                        **{"vq_train.restart_every": 2, "vq_train.continuous_baseline": False,
                           "vq_train.codebook": "loss"})
  devices = jax.devices()[:2]
  straight = vq_task.train(config, str(tmp_path / "a"), devices=devices, write_report=False)
  first = vq_task.train(config, str(tmp_path / "b"), devices=devices, stop_at=3,
                         write_report=False)
  assert int(first["step"]) == 3
  resumed = vq_task.train(config, str(tmp_path / "b"), devices=devices, write_report=False)
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # same vmapped step as the default test, with 3 groups and the discriminator
def test_per_modality_tokenizers_load_into_the_conditioner(tmp_path):
  from configs import tiny
  config = micro_config(num_train_steps=2, log_every=1, checkpoint_every=2,
                        **{"vq.per_modality": True, "vq_train.continuous_baseline": False,
                           "vq_train.adv_weight": 0.1, "vq_train.disc_layers": 1})
  wd = str(tmp_path / "pm")
  state = vq_task.train(config, wd, devices=jax.devices()[:1])
  assert jax.tree.leaves(state["params"]["vq"])[0].shape[0] == 3
  assert "disc" in state
  report = json.load(open(os.path.join(wd, "report.json")))
  assert report["per_modality_tokenizers"] and set(report["codebook_usage_per_modality"]) == {
      "depth", "seg", "edge"}
  mc = tiny.get_config()
  mc.vq.arch, mc.data.map_size = config.vq.arch.to_dict(), 16
  mc.vq.per_modality, mc.vq.params = True, os.path.join(wd, "vq.safetensors")
  cond = build.conditioner(mc)
  frozen = frozen_params(mc, cond)
  maps = jax.random.uniform(jax.random.key(1), (2, 3, 16, 16, 3), minval=-1, maxval=1)
  ids = cond.modality_ids(frozen, maps)
  assert ids.shape == (2, 3, 8, 8)
  model = vqgan_lib.VQGAN(build.vq_arch(config, config.compute_dtype))
  for k in range(3):  # modality k goes through tokenizer k
    p = jax.tree.map(lambda a: a[k], jax.device_get(state["params"]["vq"]))
    np.testing.assert_array_equal(ids[:, k], vq_report.reconstruct(model, p, maps[:, k])[1])


def test_bad_settings_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="config.vq_train.codebook"):
    vq_task.VQTask(micro_config(**{"vq_train.codebook": "kmeans"}), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.vq_train.shards"):
    vq_task.VQTask(micro_config(**{"vq_train.source": "shards",
                                    "vq_train.shards": str(tmp_path / "none")}), str(tmp_path))
  with pytest.raises(ValueError, match="disc_layers=3 is too deep"):
    vq_task.VQTask(micro_config(**{"vq_train.adv_weight": 0.1}), str(tmp_path))
  with pytest.raises(ValueError, match="lpips_params"):
    vq_task.VQTask(micro_config(**{"vq_train.perceptual_weight": 1.0}), str(tmp_path))


def test_perceptual_term_loads_lpips_weights(tmp_path):
  from mmsr_jax.weights import params_io
  from mmsr_jax.evaluation import lpips as lpips_lib
  abstract = lpips_lib.abstract_params("vgg")["params"]
  rng = np.random.default_rng(0)
  path = str(tmp_path / "lpips.safetensors")
  params_io.save_params(path, jax.tree.map(
      lambda a: rng.uniform(0, 0.1, a.shape).astype(np.float32), abstract))
  task = vq_task.VQTask(micro_config(**{"vq_train.perceptual_weight": 1.0,
                                         "vq_train.lpips_params": path}), str(tmp_path),
                         devices=jax.devices()[:1])
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  f = jax.jit(task._perceptual)
  assert abs(float(f(x, x, jnp.ones(2)))) < 1e-9
  assert float(f(x, -x, jnp.ones(2))) > 1e-6
  assert float(f(x, -x, jnp.zeros(2))) == 0.0  # weights 0: absent maps do not count


# ------------------------------------------------------------------------------- tokenize
def _write_annotated_shards(folder, n_shards=2, per_shard=3):
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  records = []
  for s in range(n_shards):
    w = ArrayRecordWriter(os.path.join(folder, SHARD_PATTERN.format(s, n_shards)),
                          "group_size:1")
    for i in range(per_shard):
      seg = synthetic.synthetic_seg(rng, 48)
      maps = {"depth": synthetic.synthetic_depth(rng, 48, seg), "seg": seg,
              "edge": synthetic.synthetic_edge(rng, 48)}
      if i == 1:
        del maps["seg"]  # a record without segmentation
      image = rng.integers(0, 256, (48, 48, 3), np.uint8)
      rec = encode_record(image, dict(maps, caption=f"record {s}-{i}"),
                                   {"name": f"r{s}{i}"})
      w.write(rec)
      records.append(rec)
    w.close()
  return records


def test_maps_from_annotator_shards(tmp_path):
  _write_annotated_shards(str(tmp_path / "ann"))  # 6 records, the one at index 1 of each without seg
  config = micro_config(**{"vq_train.source": "shards", "vq_train.shards": str(tmp_path / "ann"),
                           "vq_train.heldout_every": 3, "vq_train.synthetic_for_missing": False,
                           "vq_train.synthetic_fraction": 0.0, "vq_train.eval_synthetic": 0,
                           "vq_train.eval_crops": 2, "batch_size": 4})
  assert len(vq_examples.ShardRecords(config.vq_train.shards, "train", 3)) == 4
  batch = next(iter(vq_examples.make_loader(config)))
  assert batch["maps"].shape == (4, 3, 16, 16, 3)
  assert batch["present"][:, 0].all() and batch["present"][:, 2].all()
  assert not batch["present"][:, 1].all()  # the records without seg stay without seg
  held = vq_examples.heldout_maps(config)  # records 0 and 3 (both with seg), 2 crops each
  assert {k: h["num_real"] for k, h in held.items()} == {"depth": 4, "seg": 4, "edge": 4}
  assert all(h["num_synthetic"] == 0 for h in held.values())


def _vq_workdir(path, map_size=None):
  """A train_vq workdir holding the shipped tiny tokenizer (trained by configs/vq_tiny.py), its
  config's map size replaced by ``map_size`` when given (the weights are convolutional)."""
  from configs import vq_tiny
  from mmsr_jax.runtime import checkpoint as ckpt_lib
  os.makedirs(path)
  c = vq_tiny.get_config()
  if map_size is not None:
    c.data.map_size = map_size
  ckpt_lib.save_config(path, c)
  shutil.copyfile(ASSET, os.path.join(path, "vq.safetensors"))
  return path


def test_tokenize_then_decode_round_trips_through_shards(tmp_path):
  from array_record.python.array_record_module import ArrayRecordReader

  records = _write_annotated_shards(str(tmp_path / "ann"))
  vq_dir = _vq_workdir(str(tmp_path / "vq"))
  cfg = encoder_pass.with_vq_run(small_config(), vq_dir)
  outs = encoder_pass.precompute_shards(cfg, str(tmp_path / "ann"), str(tmp_path / "tok"),
                                        features=("vq",), crop_size=0, batch_size=4,
                                      log=lambda _: None)
  assert [os.path.basename(o) for o in outs] == sorted(os.listdir(tmp_path / "ann"))
  out_records = []
  for o in outs:
    r = ArrayRecordReader(o)
    out_records += [r.read([i])[0] for i in range(r.num_records())]
    r.close()
  assert len(out_records) == len(records)
  vq = encoder_pass.load_vq(vq_dir)
  psnrs = {"depth": [], "seg": [], "edge": []}
  blank_psnrs = []
  for src, out in zip(records, out_records):
    a, b = decode_record(src), decode_record(out)
    assert a["caption"] == b["caption"] and a["meta"] == b["meta"]  # the record is kept
    np.testing.assert_array_equal(a["image"], b["image"])
    ids, present, meta = read_ids(out, grid=8)
    assert meta["grid"] == 8 and meta["codebook_size"] == 64
    np.testing.assert_array_equal(present, [True, a["seg"] is not None, True])
    maps = encoder_pass.record_maps_full(a, vq.map_size)
    for k, i in (("depth", 0), ("seg", 1), ("edge", 2)):
      if not present[i]:
        assert k not in maps and np.all(ids[i] == 0)
        continue
      np.testing.assert_array_equal(ids[i], vq.encode(k, maps[k][None])[0])
      rec = vq.decode(k, ids[i][None])
      psnrs[k].append(float(L.psnr(jnp.asarray(maps[k][None]), jnp.asarray(rec))[0]))
      if k == "edge":
        blank_psnrs.append(float(L.psnr(jnp.asarray(maps[k][None]), -jnp.ones_like(rec))[0]))
  # The trained tokenizer reconstructs the maps from the stored ids (random weights give ~6 dB).
  assert np.mean(psnrs["depth"]) > 18.0, psnrs
  assert np.mean(psnrs["seg"]) > 11.0, psnrs
  print("round-trip PSNR", {k: np.round(v, 2).tolist() for k, v in psnrs.items()},
        "blank edge maps", np.round(blank_psnrs, 2).tolist())
  # Edges survive too: a tokenizer that draws no lines would score the blank map's PSNR.
  assert np.mean(psnrs["edge"]) > np.mean(blank_psnrs) + 2.5, (psnrs, blank_psnrs)
  # Existing outputs are never replaced silently.
  with pytest.raises(FileExistsError, match="--overwrite"):
    encoder_pass.precompute_shards(cfg, str(tmp_path / "ann"), str(tmp_path / "tok"))
  with pytest.raises(ValueError, match="no token ids"):
    read_ids(records[0])


def test_conditioner_reads_precomputed_ids(tmp_path):
  from tests.conftest import small_config
  cfg = small_config()
  cond = build.conditioner(cfg)
  frozen = frozen_params(cfg, cond)
  b, m = 2, cfg.data.map_size
  rng = jax.random.key(3)
  batch = {"lr": jnp.zeros((b, 8, 8, 3)), "text_ids": jnp.zeros((b, 16), jnp.int32),
           "text_mask": jnp.ones((b, 16), jnp.int32),
           **{k: jax.random.uniform(jax.random.fold_in(rng, i), (b, m, m, 3), minval=-1, maxval=1)
              for i, k in enumerate(("depth", "seg", "edge"))}}
  from_encoder = cond(frozen, batch)["ids"]
  cfg.vq.ids_from = "shards"
  cond_s = build.conditioner(cfg)
  # Depth and seg ids come from the batch (here: made up), edge ids from the encoder on 'edge'.
  made_up = (from_encoder + 1) % cfg.vq.arch.num_vq_embeddings
  no_maps = {k: v for k, v in batch.items() if k not in ("depth", "seg", "edge")}
  got = cond_s(frozen, dict(no_maps, edge=batch["edge"], vq_ids=made_up.at[:, 2].set(0)))["ids"]
  np.testing.assert_array_equal(got[:, :2], made_up[:, :2])
  np.testing.assert_array_equal(got[:, 2], from_encoder[:, 2])
  # A batch without vq_ids (held-out examples, not read from shards) is encoded whole.
  np.testing.assert_array_equal(cond_s(frozen, batch)["ids"], from_encoder)
  with pytest.raises(ValueError, match="vq_ids"):
    cond_s(frozen, no_maps)
  with pytest.raises(ValueError, match="no 'edge'"):
    cond_s(frozen, dict(no_maps, vq_ids=made_up))
  # One tokenizer per modality: the edge ids come from the edge tokenizer (index 2).
  cfg.vq.per_modality, cfg.vq.params = True, ""  # three random tokenizers
  cond_pm = build.conditioner(cfg)
  frozen_pm = frozen_params(cfg, cond_pm)
  want = cond_pm(frozen_pm, batch)["ids"]  # all three encoded from the maps
  assert (np.asarray(want[:, 2]) != np.asarray(
      cond_pm.modality_ids_of(frozen_pm, "depth", batch["edge"]))).any()  # tokenizers differ
  got = cond_pm(frozen_pm, dict(no_maps, edge=batch["edge"], vq_ids=made_up))["ids"]
  np.testing.assert_array_equal(got[:, 2], want[:, 2])
  np.testing.assert_array_equal(got[:, :2], made_up[:, :2])
  cfg.vq.ids_from = "cache"
  with pytest.raises(ValueError, match="config.vq.ids_from"):
    tasks.validate(cfg)


@pytest.fixture(scope="module")
def crop_bank_shards(tmp_path_factory):
  """Annotated shards (6 records of 48x48, two without seg) and the same shards tokenized with a
  crop bank of 4 boxes for small_config (hr_size 32, map_size 16 -> 4x4 ids); the tokenizer."""
  from tests.conftest import small_config
  root = tmp_path_factory.mktemp("bank")
  cfg = small_config()
  _write_annotated_shards(str(root / "ann"))
  vq_dir = _vq_workdir(str(root / "vq"), map_size=cfg.data.map_size)
  encoder_pass.precompute_shards(encoder_pass.with_vq_run(cfg, vq_dir), str(root / "ann"),
                                 str(root / "tok"), features=("vq",), batch_size=16, crops=4,
                               log=lambda _: None)
  return {"ann": str(root / "ann"), "tok": str(root / "tok"), "vq": vq_dir,
          "vq_codec": encoder_pass.load_vq(vq_dir)}


def _shards_config(path, **overrides):
  from tests.conftest import small_config
  return small_config(**{"data.source": "arrayrecord", "data.path": path,
                         "data.min_image_size": 32, "vq.ids_from": "shards",
                         "data.maps_from": "record", **overrides})


def test_crop_bank_boxes():
  boxes = crops.crop_bank_boxes(48, 60, 32, 16, key=3)
  assert boxes.shape == (16, 2) and boxes.dtype == np.int32
  np.testing.assert_array_equal(boxes[0], [8, 14])  # the centre crop first
  assert len({tuple(b) for b in boxes}) == 16  # 17 x 29 positions: all distinct
  assert boxes[:, 0].max() <= 16 and boxes[:, 1].max() <= 28 and boxes.min() >= 0
  np.testing.assert_array_equal(boxes, crops.crop_bank_boxes(48, 60, 32, 16, key=3))
  assert not np.array_equal(boxes, crops.crop_bank_boxes(48, 60, 32, 16, key=4))
  few = crops.crop_bank_boxes(33, 32, 32, 5, key=0)  # 2 positions: both, then repeated
  np.testing.assert_array_equal(few[:2], [[0, 0], [1, 0]])
  assert {tuple(b) for b in few} == {(0, 0), (1, 0)}
  with pytest.raises(ValueError, match="does not fit"):
    crops.crop_bank_boxes(31, 40, 32, 4, key=0)


def test_shard_ids_equal_the_encoder_ids_of_the_training_crops(crop_bank_shards):
  from mmsr_jax.data import sources
  vq = crop_bank_shards["vq_codec"]
  cfg = _shards_config(crop_bank_shards["tok"])
  batch = next(iter(sr_examples.make_train_loader(cfg, make_tokenizer("byte"))))
  ids, present = batch["vq_ids"], batch["present"]
  assert ids.shape == (8, 3, 4, 4) and ids.dtype == np.int32
  assert present[:, 0].all() and not present[:, 1].all() and present[:, 1].any()
  for i, k in ((0, "depth"), (1, "seg")):  # the stored ids are those of the batch's own maps
    np.testing.assert_array_equal(ids[present[:, i], i], vq.encode(k, batch[k][present[:, i]]))
    assert (ids[~present[:, i], i] == 0).all()
  assert (ids[:, 2] == 0).all()  # edges are not precomputed
  assert len({ids[j, 0].tobytes() for j in range(8)}) > 1
  # The Conditioner with ids from the shards gives the encoder path's ids, all three modalities.
  cond_s = build.conditioner(cfg)
  cond_e = build.conditioner(_shards_config(crop_bank_shards["tok"],
                                                  **{"vq.ids_from": "encoder"}))
  frozen = frozen_params(cfg, cond_e)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  got, want = np.asarray(cond_s(frozen, jb)["ids"]), np.asarray(cond_e(frozen, jb)["ids"])
  np.testing.assert_array_equal(got[present], want[present])
  # The Real-ESRGAN branch puts the same ids in its examples (edge and LR come later, batch-wise).
  src = sources.ArrayRecordSource(crop_bank_shards["tok"])
  t = sr_examples.MakeTrainingExample(cfg.data.hr_size, cfg.data.scale, cfg.data.map_size,
                                   cfg.text.max_length, make_tokenizer("byte"),
                                   degradation="realesrgan", ids_from="shards", vq_grid=4)
  for index in (0, 1):
    ex = t.random_map(src[index], np.random.default_rng(index))
    assert any(k.startswith("deg_") for k in ex) and "lr" not in ex
    for i, k in ((0, "depth"), (1, "seg")):
      if ex["present"][i]:
        np.testing.assert_array_equal(ex["vq_ids"][i], vq.encode(k, ex[k][None])[0])


def test_trainer_step_with_ids_from_shards(crop_bank_shards):
  from mmsr_jax.runtime import sharding
  cfg = _shards_config(crop_bank_shards["tok"])
  trainer = sr_task.SRTask(cfg, "/unused", devices=jax.devices()[:1])
  batch = next(iter(trainer.make_loader()))
  assert "vq_ids" in batch
  state = trainer.init_state()
  for _ in range(2):  # the first step has lr 0 under warm-up
    state, metrics = trainer.train_step(state, trainer.frozen,
                                        sharding.global_batch(batch, trainer.mesh))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


def test_ids_from_shards_errors(crop_bank_shards):
  from mmsr_jax.data import sources
  tok = make_tokenizer("byte")

  def make(**overrides):
    return sr_examples.make_train_loader(_shards_config(crop_bank_shards["tok"], **overrides), tok)

  with pytest.raises(ValueError, match="unless config.data.source='arrayrecord'"):
    tasks.validate(_shards_config(crop_bank_shards["tok"], **{"data.source": "demo"}))
  with pytest.raises(ValueError, match="record 0 has no crop bank"):
    make(**{"data.path": crop_bank_shards["ann"]})
  with pytest.raises(ValueError, match=r"32px crops != config.data.hr_size=48.*--crop_size=48"):
    make(**{"data.hr_size": 48})
  with pytest.raises(ValueError, match="map_size=16 != config.data.map_size=32"):
    make(**{"data.map_size": 32})
  with pytest.raises(ValueError, match="token grid 4x4 != the model's 8x8"):
    make(**{"vq.arch.block_out_channels": (16, 32)})
  with pytest.raises(ValueError, match="is not the tokenizer"):
    make(**{"vq.params": os.path.join(crop_bank_shards["tok"], "precompute.json")})
  with pytest.raises(ValueError, match=r"config.vq.params='' \(fingerprint random:.*is not the "
                     "tokenizer"):
    make(**{"vq.params": ""})
  # A record without a bank met during training is named.
  t = sr_examples.MakeTrainingExample(32, 4, 16, 16, tok, ids_from="shards", vq_grid=4)
  rec = sources.ArrayRecordSource(crop_bank_shards["ann"])[0]
  with pytest.raises(ValueError, match="record 'r00' has no token-id crop bank"):
    t.random_map(rec, np.random.default_rng(0))


def test_cli_errors_are_one_clear_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.precompute", f"--vq={tmp_path}/nope",
                      f"--input={tmp_path}", f"--output={tmp_path}/out"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --input=")
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.train_vq", "--config=configs/vq_tiny.py",
                      f"--workdir={tmp_path}/w", "--config.vq_train.source=nope"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "error: config.vq_train.source='nope': expected one of "
      "('demo', 'synthetic', 'shards', 'folder')")


def test_tokenize_on_two_beam_workers_writes_what_one_run_writes(crop_bank_shards, tmp_path):
  """The Beam pipeline on two local workers writes the shards one single-process run writes,
  with the same whole-map ids and crop banks (the banks are keyed by the record's global
  index, whichever worker takes the shard)."""
  pytest.importorskip("apache_beam")
  from array_record.python.array_record_module import ArrayRecordReader
  from mmsr_jax.training import encoder_pass_beam

  b = crop_bank_shards
  out = str(tmp_path / "split")
  summary = encoder_pass_beam.precompute(
      encoder_pass.with_vq_run(small_config(), b["vq"]),
      encoder_pass_beam.PrecomputeOptions(b["ann"], out, features=("vq",), batch_size=16,
                                          crop_size=32, crops=4),
      ["--direct_num_workers=2"], log=lambda _: None)
  assert sorted(summary["shards"]) == sorted(os.listdir(b["ann"]))
  assert summary["summary"]["workers"] == 2

  def records(path):
    r = ArrayRecordReader(path)
    recs = [r.read([i])[0] for i in range(r.num_records())]
    r.close()
    return recs

  for name in sorted(os.listdir(b["ann"])):
    one, split = records(os.path.join(b["tok"], name)), records(os.path.join(out, name))
    assert len(one) == len(split) == 3
    for x, y in zip(one, split):
      bank_x, bank_y = read_crop_bank(x), read_crop_bank(y)
      for k in ("boxes", "ids", "present"):
        np.testing.assert_array_equal(bank_x[k], bank_y[k])
      np.testing.assert_array_equal(read_ids(x)[0], read_ids(y)[0])
