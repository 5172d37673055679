"""``python -m mmsr_jax.convert``: folders written by diffusers / transformers ``save_pretrained``
-> our params, equal in function to the PyTorch model; PixArt -> an MMSR training start."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.weights import params_io
from mmsr_jax.models import vae as vae_lib
from mmsr_jax.weights.pixart import CaptionProjection
from tests.conftest import small_config
from mmsr_jax.training import sr_task
from mmsr_jax.weights import importers
from mmsr_jax.weights import converter
from mmsr_jax.models.mmsr import MMSR

torch = pytest.importorskip("torch", reason="converter tests build PyTorch references")
diffusers = pytest.importorskip("diffusers", reason="converter tests need diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The noise schedule PixArt-alpha was trained with: init_from refuses any other.
PIXART_SCHEDULE = {"diffusion.schedule": "linear", "diffusion.beta_start": 1e-4,
                   "diffusion.beta_end": 0.02}


def _close(ours, theirs, rel=1e-4):
  err = float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))
  scale = max(1.0, float(np.max(np.abs(theirs))))
  assert err <= rel * scale, f"max abs diff {err:.3g} (output scale {scale:.3g})"


def _tiny_vae(dtype=None):
  cfg = vae_lib.VAEConfig.tiny()
  n = len(cfg.block_out_channels)
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
      scaling_factor=0.13025).float().eval()
  return ref.to(dtype) if dtype is not None else ref, cfg


def test_vae_pipeline_folder_bf16_weights(tmp_path):
  """A pipeline folder (model_index.json + vae/) with bfloat16 weights: the converter picks the
  component, widens bf16 to fp32 exactly and reads scaling_factor from its config."""
  ref, cfg = _tiny_vae(torch.bfloat16)
  (tmp_path / "pipe").mkdir()
  (tmp_path / "pipe" / "model_index.json").write_text("{}")
  ref.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
  dst = str(tmp_path / "out")
  info = converter.convert_to_folder("vae", str(tmp_path / "pipe"), dst)
  assert info["config_overrides"]["autoencoder.scaling_factor"] == 0.13025
  params = params_io.load_params(dst, importers.vae_param_shapes(cfg)["params"])
  want = ref.decoder.conv_out.weight.float().detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"], want)
  ref = ref.float()
  z = np.random.default_rng(0).standard_normal((1, 8, 8, cfg.latent_channels)).astype(np.float32)
  with torch.no_grad():
    y_ref = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    y = vae_lib.AutoencoderKL(cfg).apply({"params": params}, z, method="decode")
  _close(y, y_ref.numpy())


def test_t5_folder_with_tokenizer_files(tmp_path):
  transformers = pytest.importorskip("transformers")
  from mmsr_jax.models import t5 as t5_lib
  torch.manual_seed(0)
  ref = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)).float().eval()
  ref.save_pretrained(tmp_path / "t5", safe_serialization=True)
  (tmp_path / "t5" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
  dst = str(tmp_path / "out")
  info = converter.convert_to_folder("t5", str(tmp_path / "t5"), dst)
  assert info["tokenizer_files"] == ["tokenizer_config.json"]
  assert os.path.isfile(os.path.join(dst, "tokenizer_config.json"))
  arch = t5_lib.T5Config(**info["config_overrides"]["text.encoder"])
  params = params_io.load_params(dst, importers.t5_param_shapes(arch)["params"])
  ids = np.random.default_rng(1).integers(0, 300, (2, 20)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 12:] = 0
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = t5_lib.T5Encoder(arch).apply({"params": params}, ids, mask)
  _close(got, want)


def test_vqgan_single_file_with_config_ids_identical(tmp_path):
  from mmsr_jax.models import vqgan as vqgan_lib
  cfg = vqgan_lib.VQGANConfig.tiny()
  n = len(cfg.block_out_channels)
  torch.manual_seed(0)
  ref = diffusers.VQModel(
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels, num_vq_embeddings=cfg.num_vq_embeddings,
      vq_embed_dim=cfg.vq_embed_dim, norm_num_groups=cfg.norm_num_groups).float().eval()
  ref.save_pretrained(tmp_path / "vq", safe_serialization=True)
  src = str(tmp_path / "vq" / "diffusion_pytorch_model.safetensors")  # a file: config beside it
  dst = str(tmp_path / "out")
  info = converter.convert_to_folder("vqgan", src, dst)
  arch = vqgan_lib.VQGANConfig(**info["config_overrides"]["vq.arch"])
  assert arch == cfg
  params = params_io.load_params(dst, importers.vqgan_param_shapes(cfg)["params"])
  x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    z = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latents
    _, _, (_, _, ids_ref) = ref.quantize(z)
  with jax.default_matmul_precision("highest"):
    ids = vqgan_lib.VQGAN(cfg).apply({"params": params}, x, method=vqgan_lib.VQGAN.encode_ids)
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1), ids_ref.numpy().reshape(-1))


def _reference_model(kind: str):
  """A tiny diffusers / transformers model of ``kind`` with every tensor random, and an input."""
  from tests.torch_random import randomise_
  rng = np.random.default_rng(7)
  torch.manual_seed(0)
  if kind == "vae":
    ref, _ = _tiny_vae()
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)  # a latent to decode
  elif kind == "vqgan":
    from mmsr_jax.models import vqgan as vqgan_lib
    cfg = vqgan_lib.VQGANConfig.tiny()
    n = len(cfg.block_out_channels)
    ref = diffusers.VQModel(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, num_vq_embeddings=cfg.num_vq_embeddings,
        vq_embed_dim=cfg.vq_embed_dim, norm_num_groups=cfg.norm_num_groups).float().eval()
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)  # an image to reconstruct
  else:
    transformers = pytest.importorskip("transformers")
    ref = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)).float().eval()
    x = rng.integers(0, 300, (2, 20)).astype(np.int32)  # token ids
  randomise_(ref, seed=4)
  return ref, x


def _torch_output(kind: str, ref, x) -> np.ndarray:
  with torch.no_grad():
    if kind == "vae":
      return ref.decode(torch.from_numpy(x).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    if kind == "vqgan":
      return ref(torch.from_numpy(x).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    return ref(input_ids=torch.from_numpy(x).long()).last_hidden_state.numpy()


def _our_output(kind: str, dst: str, info: dict, x) -> np.ndarray:
  """Our module, built from the architecture the converter recorded, on the written params."""
  from mmsr_jax.models import t5 as t5_lib
  from mmsr_jax.models import vqgan as vqgan_lib
  arch = {k: tuple(v) if isinstance(v, list) else v for k, v in info["arch"].items()
          if k not in ("scaling_factor", "shift_factor")}
  with jax.default_matmul_precision("highest"):
    if kind == "vae":
      cfg = vae_lib.VAEConfig(**arch)
      params = params_io.load_params(dst, importers.vae_param_shapes(cfg)["params"])
      return np.asarray(vae_lib.AutoencoderKL(cfg).apply({"params": params}, x, method="decode"))
    if kind == "vqgan":
      cfg = vqgan_lib.VQGANConfig(**arch)
      params = params_io.load_params(dst, importers.vqgan_param_shapes(cfg)["params"])
      return np.asarray(vqgan_lib.VQGAN(cfg).apply({"params": params}, x)[0])
    cfg = t5_lib.T5Config(**arch)
    params = params_io.load_params(dst, importers.t5_param_shapes(cfg)["params"])
    return np.asarray(t5_lib.T5Encoder(cfg).apply({"params": params}, x, np.ones_like(x)))


@pytest.mark.parametrize("kind", ["vae", "vqgan", "t5"])
def test_cli_on_the_reference_models_own_files(tmp_path, kind):
  """``save_pretrained`` writes the reference class's own ``state_dict()`` keys and config.json
  (nothing of ours builds them); the CLI converts that folder, and the module built from the
  recorded architecture computes what the PyTorch model computes, every tensor random."""
  ref, x = _reference_model(kind)
  ref.save_pretrained(tmp_path / "src", safe_serialization=True)
  dst = str(tmp_path / "converted")
  proc = subprocess.run(
      [sys.executable, "-m", "mmsr_jax.convert", f"--kind={kind}", f"--src={tmp_path / 'src'}",
       f"--dst={dst}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  info = json.loads(open(os.path.join(dst, "config.json")).read())
  assert info["num_params"] == sum(p.numel() for p in ref.parameters())
  _close(_our_output(kind, dst, info, x), _torch_output(kind, ref, x))


def _tiny_pixart(config, **kwargs):
  """A PixArt transformer shaped like ``config``'s DiT (learned-sigma outputs); ``kwargs`` go to
  ``PixArtTransformer2DModel``."""
  c = 3 * config.autoencoder.factor ** 2  # the pixel autoencoder's latent channels
  torch.manual_seed(0)
  ref = diffusers.PixArtTransformer2DModel(
      sample_size=config.data.hr_size // config.autoencoder.factor, patch_size=2,
      in_channels=c, out_channels=2 * c, num_layers=config.model.depth,
      attention_head_dim=config.model.width // config.model.num_heads,
      num_attention_heads=config.model.num_heads, cross_attention_dim=config.model.width,
      caption_channels=config.text.encoder.d_model, norm_type="ada_norm_single",
      use_additional_conditions=False, **kwargs).float().eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.1)
  return ref, c


def test_pixart_cli_then_train_start_keeps_text_to_image_function(tmp_path):
  """Convert with the CLI, start an MMSR run from it: the DiT given the caption projection of
  the text states computes PixArt's noise prediction, whatever the LR latent."""
  config = small_config(**PIXART_SCHEDULE)
  ref, c = _tiny_pixart(config)
  ref.save_pretrained(tmp_path / "pixart", safe_serialization=True)
  dst = str(tmp_path / "converted")
  proc = subprocess.run(
      [sys.executable, "-m", "mmsr_jax.convert", "--kind=pixart",
       f"--src={tmp_path / 'pixart'}", f"--dst={dst}"],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert f"--config.model.init_from={dst}" in proc.stdout
  assert "--config.model.num_heads=4" in proc.stdout
  # The same command again must not overwrite what it wrote.
  again = subprocess.run(
      [sys.executable, "-m", "mmsr_jax.convert", "--kind=pixart",
       f"--src={tmp_path / 'pixart'}", f"--dst={dst}"], cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 2 and "is not empty (it holds an earlier conversion" in again.stderr

  config.model.init_from = dst
  trainer = sr_task.SRTask(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  state = jax.device_get(trainer.init_state())
  params = state.params
  rng = np.random.default_rng(3)
  lat = config.data.hr_size // config.autoencoder.factor
  z = rng.standard_normal((2, lat, lat, c)).astype(np.float32)
  lr_latent = rng.standard_normal((2, lat, lat, c)).astype(np.float32) * 5
  t = np.array([10.0, 900.0], np.float32)
  text = rng.standard_normal((2, 6, config.text.encoder.d_model)).astype(np.float32)
  ctx = CaptionProjection(config.model.width).apply(
      {"params": {k: params["context"][k] for k in ("caption_projection_1",
                                                    "caption_projection_2")}}, text)
  with jax.default_matmul_precision("highest"):
    ours = trainer.system.model.apply({"params": params}, jnp.asarray(z), jnp.asarray(t),
                               jnp.asarray(lr_latent), ctx, method=MMSR.denoise)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(z).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(
        text), timestep=torch.from_numpy(t), return_dict=False)[0].numpy()
  _close(ours, theirs[:, :c].transpose(0, 2, 3, 1))
  # EMA starts at the pretrained weights; the optimizer's moments at zero.
  np.testing.assert_array_equal(state.ema_params["dit"]["proj_out"]["kernel"],
                                params["dit"]["proj_out"]["kernel"])
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state)
             if np.ndim(x) > 0)


def test_pixart_init_from_checks_the_architecture(tmp_path):
  config = small_config(**PIXART_SCHEDULE)
  ref, _ = _tiny_pixart(config)
  ref.save_pretrained(tmp_path / "pixart", safe_serialization=True)
  dst = str(tmp_path / "converted")
  converter.convert_to_folder("pixart", str(tmp_path / "pixart"), dst)
  bad_heads = small_config(**{"model.init_from": dst, "model.num_heads": 2, **PIXART_SCHEDULE})
  with pytest.raises(ValueError, match="4 attention heads but config.model.num_heads=2"):
    sr_task.SRTask(bad_heads, str(tmp_path / "a"), devices=jax.devices()[:1])
  bad_text = small_config(**{"model.init_from": dst, **PIXART_SCHEDULE,
                             "text.encoder.d_model": 32, "text.encoder.num_heads": 2})
  with pytest.raises(ValueError, match=r"caption_projection_1/kernel.*\(64, 64\).*\(32, 64\)"):
    sr_task.SRTask(bad_text, str(tmp_path / "b"), devices=jax.devices()[:1])


def test_pixart_init_from_refuses_another_schedule_or_position_scale(tmp_path):
  """A start from a converted PixArt is refused, before any weights are read, when the run's
  noise schedule or position interpolation_scale differs from what the folder records: the
  default PixArt schedule (no scheduler config), one read from the source pipeline's scheduler
  config, and interpolation_scale = 2."""
  config = small_config(**PIXART_SCHEDULE)
  ref, _ = _tiny_pixart(config)
  ref.save_pretrained(tmp_path / "plain", safe_serialization=True)
  plain = str(tmp_path / "plain_converted")
  converter.convert_to_folder("pixart", str(tmp_path / "plain"), plain)
  # The tiny config's SD scaled-linear betas against PixArt's linear ones.
  sd_betas = small_config(**{"model.init_from": plain})
  assert sd_betas.diffusion.schedule == "scaled_linear"
  with pytest.raises(ValueError, match=re.escape(
      f"config.model.init_from={plain!r} was trained with another noise schedule than this "
      "config's: config.diffusion.schedule='scaled_linear' (trained with 'linear'); "
      "config.diffusion.beta_start=0.00085 (trained with 0.0001); config.diffusion.beta_end=0.012 "
      "(trained with 0.02)")):
    sr_task.SRTask(sd_betas, str(tmp_path / "a"), devices=jax.devices()[:1])

  # A pipeline whose scheduler trained another beta_end: the PixArt default is refused for it.
  ref.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True)
  (tmp_path / "pipe" / "scheduler").mkdir()
  (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear",
       "beta_start": 1e-4, "beta_end": 0.03, "num_train_timesteps": 1000,
       "prediction_type": "epsilon"}))
  piped = str(tmp_path / "pipe_converted")
  converter.convert_to_folder("pixart", str(tmp_path / "pipe" / "transformer"), piped)
  with pytest.raises(ValueError, match=r"config\.diffusion\.beta_end=0\.02 \(trained with 0\.03\).*"
                     r"scheduler_config\.json.*--config\.diffusion\.beta_end=0\.03"):
    sr_task.SRTask(small_config(**{"model.init_from": piped, **PIXART_SCHEDULE}),
                   str(tmp_path / "b"), devices=jax.devices()[:1])

  # interpolation_scale = 2 (PixArt-Sigma 1024) against the default 1.
  scaled_ref, _ = _tiny_pixart(config, interpolation_scale=2)
  scaled_ref.save_pretrained(tmp_path / "scaled", safe_serialization=True)
  scaled = str(tmp_path / "scaled_converted")
  info = converter.convert_to_folder("pixart", str(tmp_path / "scaled"), scaled)
  assert info["config_overrides"]["model.pos_interpolation_scale"] == 2.0
  with pytest.raises(ValueError, match=re.escape(
      "was trained with position interpolation_scale=2 but config.model.pos_interpolation_scale=1;"
      " set --config.model.pos_interpolation_scale=2")):
    sr_task.SRTask(small_config(**{"model.init_from": scaled, **PIXART_SCHEDULE}),
                   str(tmp_path / "c"), devices=jax.devices()[:1])


def test_refuses_pickles_and_names_mismatched_keys(tmp_path):
  (tmp_path / "pt").mkdir()
  (tmp_path / "pt" / "config.json").write_text("{}")
  (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"not even read")
  for src in (str(tmp_path / "pt"), str(tmp_path / "model.ckpt")):
    with pytest.raises(ValueError, match="never loaded.*weights_only=True"):
      converter.convert_to_folder("vae", src, str(tmp_path / "out"))
  ref, cfg = _tiny_vae()
  ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
  cfg_path = tmp_path / "vae" / "config.json"
  bad = json.loads(cfg_path.read_text())
  bad["latent_channels"] = 8  # the weights have 4
  cfg_path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"'decoder\.conv_in\.weight'.*\(32, 4, 3, 3\).*expects"):
    converter.convert_to_folder("vae", str(tmp_path / "vae"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "params.safetensors")


def test_convert_writes_only_into_a_new_or_empty_folder(tmp_path):
  """A --dst holding anything (a training run, an earlier conversion, other files) is refused
  before the source is read, and what it holds is left as it was."""
  from mmsr_jax.runtime import checkpoint as ckpt_lib
  ref, _ = _tiny_vae()
  ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
  src = str(tmp_path / "vae")
  run = tmp_path / "run"
  ckpt_lib.save_config(str(run), small_config())
  (run / "checkpoints").mkdir()
  before = (run / "config.json").read_bytes()
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  for dst, what in ((run, "a training run"), (other, "files: notes.txt")):
    with pytest.raises(FileExistsError, match=rf"--dst={dst} is not empty \(it holds {what}\)"):
      converter.convert_to_folder("vae", src, str(dst))
  assert (run / "config.json").read_bytes() == before
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json"]
  assert os.listdir(other) == ["notes.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  converter.convert_to_folder("vae", src, str(empty))
  with pytest.raises(FileExistsError, match=r"an earlier conversion \(vae of "):
    converter.convert_to_folder("vae", src, str(empty))


def test_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match="not a local path, and downloading it from the hub failed"):
    converter.convert_to_folder("t5", "nobody/no-such-model", str(tmp_path / "out"))
