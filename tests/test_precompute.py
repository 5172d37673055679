"""Training from precomputed conditioning: the precompute pass writes caption states and HR
latents; a train step that reads them equals the step that computes them (same crops and flips);
features of another encoder are refused before training starts."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmsr_jax.data import sr_examples
from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.formats.records import (HR_LATENTS_KEY, NULL_TEXT_FILE, TEXT_STATES_KEY,
                                      list_shards, read_features)
from mmsr_jax.models.vae import VAEConfig
from mmsr_jax.runtime import sharding
from mmsr_jax.training import encoder_pass, sr_task
from tests.conftest import small_config
from tests.test_vq_train import _write_annotated_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path, **overrides):
  """small_config on annotated shards, with a tiny KL VAE (so the latents are a real encoder's)
  and the random tiny T5; features from ``*_from`` fields."""
  tiny = VAEConfig.tiny()
  return small_config(**{
      "data.source": "arrayrecord", "data.path": path, "data.min_image_size": 32,
      "data.maps_from": "record",
      "autoencoder.kind": "vae", "autoencoder.factor": tiny.downsample_factor,
      "autoencoder.scaling_factor": 0.5, "autoencoder.shift_factor": 0.1,
      "autoencoder.arch.block_out_channels": tiny.block_out_channels,
      "autoencoder.arch.layers_per_block": tiny.layers_per_block,
      "autoencoder.arch.latent_channels": tiny.latent_channels,
      "autoencoder.arch.norm_num_groups": tiny.norm_num_groups,
      "vq.ids_from": "shards", **overrides})


def annotated_and_precomputed(root) -> dict:
  """6 annotated records in 2 shards under ``root/ann``, the single-process pass's output of
  them under ``root/pre`` (4 crops, float32) and the config it ran with: the input and the
  reference of the precompute tests here and of the Beam pipeline's."""
  _write_annotated_shards(str(root / "ann"))
  cfg = _config(str(root / "ann"))
  encoder_pass.precompute_shards(cfg, str(root / "ann"), str(root / "pre"), crops=4,
                                 dtype="float32", log=lambda _: None)
  return {"ann": str(root / "ann"), "pre": str(root / "pre"), "cfg": cfg}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return annotated_and_precomputed(tmp_path_factory.mktemp("pre"))


def test_the_pass_writes_caption_states_and_latents(shards):
  from array_record.python.array_record_module import ArrayRecordReader
  files = list_shards(shards["pre"], "x")
  r = ArrayRecordReader(files[0])
  arrays, meta = read_features(r.read([0])[0])
  r.close()
  cfg = _config(shards["pre"])
  lat = cfg.data.hr_size // cfg.autoencoder.factor
  assert arrays[HR_LATENTS_KEY].shape == (4, 2, lat, lat, 4)
  ids, mask = make_tokenizer("byte").encode("record 0-0", cfg.text.max_length)
  assert arrays[TEXT_STATES_KEY].shape == (int(mask.sum()), cfg.text.encoder.d_model)
  assert meta[TEXT_STATES_KEY]["fingerprint"].startswith("random:")
  assert os.path.isfile(os.path.join(shards["pre"], NULL_TEXT_FILE))


def _step(cfg):
  task = sr_task.SRTask(cfg, "/unused", devices=jax.devices()[:1])
  batch = next(iter(task.make_loader()))
  state = task.init_state()
  for _ in range(2):  # the first step has lr 0 under warm-up
    state, metrics = task.train_step(state, task.frozen, sharding.global_batch(batch, task.mesh))
  return task, batch, jax.device_get(state.params), float(metrics["loss"])


def test_step_from_precomputed_features_equals_the_step_computing_them(shards):
  """Both read the crop bank (same boxes and flips); one encodes caption and HR crop, the other
  reads them. Equal to 1e-5 (relative to the largest parameter)."""
  enc_task, enc_batch, enc_params, enc_loss = _step(_config(shards["pre"]))
  sh_task, sh_batch, sh_params, sh_loss = _step(_config(
      shards["pre"], **{"text.states_from": "shards", "autoencoder.hr_latents_from": "shards"}))
  assert "text" in enc_task.frozen and "text" not in sh_task.frozen  # T5 off the devices
  assert "text_states" in sh_batch and "hr_latent" in sh_batch
  np.testing.assert_array_equal(enc_batch["hr"], sh_batch["hr"])  # the same crops and flips
  np.testing.assert_array_equal(enc_batch["lr"], sh_batch["lr"])
  # The stored latents are the encoder's latents of the batch's own HR crops.
  want = jax.jit(enc_task.system.conditioner.encode_image)(enc_task.frozen, enc_batch["hr"])
  np.testing.assert_allclose(sh_batch["hr_latent"], want, atol=1e-5)
  np.testing.assert_allclose(sh_loss, enc_loss, rtol=1e-5)
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
  a, b = flat(sh_params), flat(enc_params)
  assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
  # The dropped caption gets the empty caption's states: the same from the shards and encoded.
  for x, y in zip(sh_task.null_text(), enc_task.null_text()):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_features_of_another_encoder_are_refused(shards):
  tok = make_tokenizer("byte")
  stale = _config(shards["pre"], **{"text.states_from": "shards", "seed": 1})
  with pytest.raises(ValueError, match="caption states written with text fingerprint"):
    sr_examples.make_train_loader(stale, tok)
  with pytest.raises(ValueError, match="HR latents written with autoencoder fingerprint"):
    sr_examples.make_train_loader(
        _config(shards["pre"], **{"autoencoder.hr_latents_from": "shards",
                                  "autoencoder.scaling_factor": 0.25, "seed": 0}), tok)
  with pytest.raises(ValueError, match="has no 'text_states'"):
    precompute_only_vq = shards["ann"]
    sr_examples.make_train_loader(_config(precompute_only_vq, **{
        "text.states_from": "shards", "vq.ids_from": "encoder"}), tok)


def test_stale_shards_are_one_error_line_from_the_cli(shards, tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "mmsr_jax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path}/run", "--config.data.source=arrayrecord",
       f"--config.data.path={shards['pre']}", "--config.text.states_from=shards",
       "--config.data.hr_size=32", "--config.data.map_size=16", "--config.data.min_image_size=32",
       "--config.text.max_length=16", "--config.num_train_steps=2", "--config.seed=3"],
      capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
      timeout=600)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "caption states written with text fingerprint" in last


def test_crop_images_give_the_example_of_the_full_image(shards):
  """The pass stores each bank box's crop (PNG, lossless) and maps; an example built from them,
  without decoding the photo, equals the one cut from the decoded full image (same box, flip)."""
  from mmsr_jax.data import sources
  from mmsr_jax.formats.records import read_crop_bank, read_crops
  cfg = _config(shards["pre"])
  full = sources.ArrayRecordSource(shards["pre"])
  lean = sources.ArrayRecordSource(shards["pre"], crops_only=True)
  assert isinstance(sources.make_source(cfg).inner, sources.ArrayRecordSource)
  assert sources.make_source(cfg).inner.crops_only
  data = full.raw(1)  # the record without segmentation
  crops, bank = read_crops(data), read_crop_bank(data)
  assert crops["meta"]["encoding"] == "png" and crops["meta"]["maps"] == ["depth"]
  assert crops["meta"]["boxes"] == len(bank["boxes"]) == 4
  tok = make_tokenizer("byte")
  make = sr_examples.MakeTrainingExample(
      cfg.data.hr_size, cfg.data.scale, cfg.data.map_size, cfg.text.max_length, tok,
      degradation="simple", ids_from="shards")
  for i in range(len(full)):
    a_rec, b_rec = full[i], lean[i]
    assert a_rec["image"] is not None and b_rec["image"] is None and "crops" in b_rec
    for seed in range(3):
      a = make.random_map(a_rec, np.random.default_rng([i, seed]))
      b = make.random_map(b_rec, np.random.default_rng([i, seed]))
      assert set(a) == set(b)
      for k in a:
        if k == "depth":  # stored as 16-bit PNG of the depth resized onto the image grid
          np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=k)
        else:
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert a_rec["seg"] is not None and np.abs(a["seg"]).sum() > 0  # the maps travel too


def test_grain_worker_processes_on_precomputed_shards_resume(shards, tmp_path):
  """config.data.num_workers=2 on the arrayrecord crop path, with the Real-ESRGAN prefetch
  thread on top: batches come, and the checkpointed iterator resumes exactly."""
  import grain
  import orbax.checkpoint as ocp
  from absl import flags
  if not flags.FLAGS.is_parsed():  # as the CLI leaves them; Grain's workers read its flags
    flags.FLAGS.mark_as_parsed()
  cfg = _config(shards["pre"], **{"data.num_workers": 2, "data.degradation": "realesrgan",
                                  "data.prefetch": 2, "batch_size": 2})
  tok = make_tokenizer("byte")
  it = iter(sr_examples.make_train_loader(cfg, tok))
  first = next(it)
  assert first["hr"].shape == (2, 32, 32, 3) and first["lr"].shape == (2, 8, 8, 3)
  assert first["vq_ids"].shape[:2] == (2, 3)
  next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(3)]  # crosses the epoch boundary (6 records)
  fresh = iter(sr_examples.make_train_loader(cfg, tok))
  restored = mngr.restore(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))).data
  mngr.close()
  for w in want:
    got = next(restored)
    assert set(got) == set(w)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  for x in (it, restored):
    x.close()
  del it, restored, fresh
  gc.collect()  # Grain's worker processes stop with their iterators, not at interpreter exit
