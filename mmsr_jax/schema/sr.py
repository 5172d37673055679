"""The super-resolution task's config schema (``python -m mmsr_jax.train``) and its checks.

``sr_config()`` declares every field an SR run reads, with defaults; ``configs/*.py`` start from
it (or from ``full_size_config``), so a ``--config.x=...`` override naming no field fails before
anything runs. ``validate`` checks every value and cross-field rule once.
"""

from __future__ import annotations

import math
import re

import ml_collections

from mmsr_jax.schema import common
from mmsr_jax.schema.choices import (ATTENTION, DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_PIXELS,
                                     DEGRADATION_PRESETS, GUIDANCE_MODES, PREDICTIONS, REMAT,
                                     SCHEDULES, SPACINGS, pillow_limit)
from mmsr_jax.schema.vq import vq_arch, vq_downsample

TASK = "sr"
SOURCES = ("demo", "folder", "tfds", "arrayrecord")
DEGRADATIONS = ("simple",) + DEGRADATION_PRESETS
AUTOENCODERS = ("pixel", "vae")
IDS_FROM = ("encoder", "shards")
# Where the training / held-out modality maps come from: "record" (the record's depth / seg, Canny
# edges of the degraded LR), or all three made by fixed image operators
# (data.modalities.operator_maps) from the degraded "lr" or, as an oracle, from the "hr" crop.
MAPS_FROM = ("record", "lr", "hr")
# The research configs' negative prompt (m0cfg / mcfg negative branch); cfg uses the empty one.
NEGATIVE_PROMPT = ("blurry, noisy, jpeg artifacts, low resolution, oversmoothed, distorted, "
                   "low quality")
TEXT_DEVICES = ("auto", "accelerator", "cpu")
# Fields that fix the shapes of the saved state: a resume must not change them.
ARCH_FIELDS = ("model", "autoencoder", "vq", "text", "diffusion", "data.scale", "data.map_size")


def sr_config() -> ml_collections.ConfigDict:
  c = common.common_config()
  c.task = TASK

  c.data.source = "demo"  # "demo", "folder" (images under path), "tfds" (path = name),
  c.data.path = ""  # "arrayrecord" (path = annotator / precompute shards)
  c.data.hr_size = 512  # training crop (HR pixels)
  c.data.scale = 4
  c.data.eval_size = 512  # held-out centre crops of the report
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""  # "" = the TFDS default
  c.data.image_key = ""  # TFDS image feature; "" = "hr" if present, else "image"
  c.data.caption_key = ""  # TFDS caption feature; "" = no caption
  # Source 'folder': a regular expression with one group that makes a caption of an image's file
  # name where it has no sidecar .txt (underscores become spaces); "" = none.
  c.data.caption_from_name = ""
  c.data.eval_path = ""  # folder of held-out images for the report; "" = the demo photos
  c.data.min_image_size = 64  # smaller images are skipped as bad
  c.data.max_bad_fraction = 0.05  # a larger share of bad images stops the run
  # Larger images are skipped as bad, by their headers (not decoded): 8192 x 8192.
  c.data.max_image_pixels = DEFAULT_MAX_PIXELS
  c.data.degradation = "simple"  # one stage (tiny demo), "realesrgan" or "seesr"
  c.data.prefetch = 2  # batches degraded ahead in a thread (realesrgan / seesr)
  c.data.maps_from = "record"  # one of MAPS_FROM

  c.text = ml_collections.ConfigDict()
  c.text.tokenizer = "byte"  # "byte" or a folder / hub id of a transformers tokenizer
  c.text.max_length = 77
  c.text.params = ""  # frozen text-encoder weights (mmsr_jax.convert output); "" = random
  # "encoder": run the text encoder in every step; "shards": read the caption states written by
  # python -m mmsr_jax.precompute (the text encoder then never sits on the accelerators).
  c.text.states_from = "encoder"
  c.text.encoder = ml_collections.ConfigDict(dict(
      vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"))

  c.vq = ml_collections.ConfigDict()
  c.vq.params = ""  # frozen tokenizer weights (train_vq's vq.safetensors); "" = random
  c.vq.arch = vq_arch()
  c.vq.per_modality = False  # vq.params holds one tokenizer per modality
  # "encoder": encode every map every step; "shards": depth / seg ids of the training crops are
  # read from precomputed shards (edge ids are still encoded: edges come from the degraded LR).
  c.vq.ids_from = "encoder"

  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.kind = "vae"  # "pixel" (space-to-depth) or "vae" (SD-compatible KL-f8)
  c.autoencoder.factor = 8
  c.autoencoder.scaling_factor = 0.18215
  c.autoencoder.shift_factor = 0.0  # latent = (mean - shift) * scale
  c.autoencoder.params = ""  # kind 'vae': weights (mmsr_jax.convert output); "" = random
  # "encoder": encode the HR crop in every step; "shards": read the latents of the shards' crop
  # bank (python -m mmsr_jax.precompute). The LR latent is encoded every step either way.
  c.autoencoder.hr_latents_from = "encoder"
  c.autoencoder.arch = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
      layers_per_block=2, latent_channels=4, norm_num_groups=32))

  c.model = ml_collections.ConfigDict()
  c.model.width = 1024
  c.model.depth = 24
  c.model.num_heads = 16
  c.model.patch_size = 2
  c.model.mlp_ratio = 4.0
  c.model.remat = "none"  # "none", "full" (recompute each block), "dots" (keep matmul outputs)
  c.model.attention = "auto"  # "auto", "xla", "cudnn" (GPU), "flash" (TPU Pallas)
  c.model.context_latents = 128
  c.model.context_depth = 2
  c.model.context_heads = 16
  # Tie the connector's latents to places: a square grid of them, each starting at its cell's
  # sin-cos position on the map grid (models/context.py). False is the paper's free latents.
  c.model.context_latent_positions = False
  # Also give the DiT each place's map tokens, pooled onto its token grid and added to its patch
  # tokens (models/context.py). Not in the paper, where the maps reach the DiT only through the
  # connector's latents; the context experiment (docs/context_experiment.md) compares both.
  c.model.context_spatial = False
  c.model.init_from = ""  # a folder from mmsr_jax.convert --kind=pixart
  # A train step compiled ahead of time for this slice (python -m mmsr_jax.aot
  # --save_executable=PATH): loaded instead of compiling when it is the same program.
  c.compiled_step = ""
  # The train step runs its frozen encoders (VAE, VQ) over the batch in this many sequential
  # passes: the same result, with their activations held for one pass at a time (the VAE encode
  # at the HR size is most of the step's peak memory on a TPU chip: docs/tpu.md).
  c.encode_passes = 1
  # PixArt's interpolation_scale: positions = index / (grid / base) / scale (the converter sets it)
  c.model.pos_interpolation_scale = 1.0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.prediction = "epsilon"
  c.diffusion.rescale_zero_snr = False
  c.diffusion.min_snr_gamma = 0.0  # 0 disables min-SNR weighting
  # Diffuse residual_scale * (z_HR - z_LR) instead of z_HR (the LR latent is still an input).
  c.diffusion.residual = False
  c.diffusion.residual_scale = 1.0

  c.cond_dropout = ml_collections.ConfigDict()
  # How often each condition is dropped in all, joint drops included (MMSR: 0.1 per modality).
  # The independent draws take the rate that makes up the rest (independent_drop_rates).
  c.cond_dropout.modality_total = 0.1  # each spatial modality -> its null block
  c.cond_dropout.text_total = 0.1  # caption -> empty caption
  # Joint drops, so that the guidance modes' negative branches are trained (independent drops
  # alone give "empty caption and every modality null" with p^4 = 1e-4). They are part of the
  # totals above, so they may not exceed them.
  c.cond_dropout.all = 0.05  # caption and every modality together (cfg's negative branch)
  c.cond_dropout.all_modalities = 0.025  # every modality, caption kept (m0cfg's negative branch)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.steps = 50
  c.sampling.eta = 0.0
  c.sampling.spacing = "leading"
  c.sampling.guidance = "mcfg"
  c.sampling.scale = 2.0
  c.sampling.negative_prompt = NEGATIVE_PROMPT
  c.sampling.clip_x0 = 0.0  # > 0 clips the predicted x0
  c.sampling.seed = 0
  c.sampling.strength = 1.0  # < 1 starts from the upsampled LR, noised (fidelity over detail)
  # Where the text encoder runs while sampling: "accelerator", "cpu" (weights on the host,
  # states passed in) or "auto" (cpu above 1 GiB of weights on an accelerator backend).
  c.sampling.text_device = "auto"
  # Largest input image (pixels, 2048 x 2048): its x4 output has 16 times as many.
  c.sampling.max_input_pixels = DEFAULT_MAX_INPUT_PIXELS
  # The work of an input is its tile count: a thin image needs many tiles for few pixels.
  # max_tiles 0: the tiles of the largest square input (max_input_pixels) at the trained tile.
  c.sampling.max_tiles = 0
  c.sampling.max_aspect_ratio = 16.0

  c.eval = ml_collections.ConfigDict()
  c.eval.steps = 50
  c.eval.scale = 0.0  # guidance scale of the report's samples (0 = conditional only)
  c.eval.val_batches = 4  # noise draws per held-out example for val_loss
  c.eval.sample_ablation = False  # also sample the held-out crops with each group nulled
  return c


def full_size_config(*, width: int, depth: int, num_heads: int, lr: float,
                     init_from: str = "") -> ml_collections.ConfigDict:
  """The research configuration (docs/model.md) at one denoiser size (``configs/dit_*.py``): SD
  KL-f8 VAE, T5 v1.1 XXL, VQGAN f16 tokenizers, a 128-latent MMLC, 512 px crops, bf16, FSDP.
  Frozen parts are read from the ``weights/`` folders that the conversion commands of
  docs/training.md ("Pretrained weights") write."""
  c = sr_config()
  c.batch_size = 256
  c.num_train_steps = 200_000
  c.log_every = 100
  c.checkpoint_every = 2_000
  c.compute_dtype = "bfloat16"
  c.mesh.data = 1  # FSDP over every device (set data = number of slices for multi-slice)
  c.mesh.fsdp = -1
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = 1_000
  c.optimizer.weight_decay = 0.03
  c.optimizer.ema_decay = 0.9999

  # Train from shards that carry the frozen encoders' outputs (python -m mmsr_jax.precompute
  # on annotated shards); the step then encodes only what the per-step degradation changes: the
  # LR image and its Canny edges.
  c.data.source = "arrayrecord"
  c.data.path = "data/precomputed"
  c.data.degradation = "realesrgan"
  c.data.num_workers = 16  # Grain worker processes for decode, crop and degradation sampling
  c.vq.ids_from = "shards"
  c.text.states_from = "shards"
  c.autoencoder.hr_latents_from = "shards"

  c.text.tokenizer = "weights/t5_v1_1_xxl"
  c.text.params = "weights/t5_v1_1_xxl"
  c.text.encoder = dict(
      vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
  c.vq.params = "weights/vqgan_f16_modalities"
  c.autoencoder.params = "weights/sd_vae_ft_ema"

  c.model.width = width
  c.model.depth = depth
  c.model.num_heads = num_heads
  c.model.remat = "dots"  # recomputes only elementwise work; the measurement: docs/speed.md
  # The VAE encode of the bicubic LR at 512 px in four passes: 0.6 GiB less peak per v5e chip
  # for DiT-L at 16 per chip (docs/tpu.md), the same result.
  c.encode_passes = 4
  c.model.context_heads = num_heads
  c.model.init_from = init_from
  return c


def joint_drop_rates(cond_dropout) -> tuple[float, float]:
  """The share of ``(captions, maps)`` the joint drops alone remove: ``all`` for the caption,
  ``1 - (1 - all)(1 - all_modalities)`` for each map."""
  a, b = cond_dropout.all, cond_dropout.all_modalities
  return a, 1.0 - (1.0 - a) * (1.0 - b)


def independent_drop_rates(cond_dropout) -> tuple[float, float]:
  """The ``(text, modality)`` rates of the independent drops that, composed with the joint
  drops, drop each caption with ``text_total`` and each map with ``modality_total``:
  ``p = 1 - (1 - q)(1 - j)`` with ``j`` the joint share (:func:`joint_drop_rates`), so
  ``q = 1 - (1 - p) / (1 - j)``. When the joint drops already remove everything (``j = 1``, so
  ``p = 1``) the independent rate does not matter and is 0."""
  def solve(total, joint):
    if joint >= 1.0:
      return 0.0
    return min(1.0, max(0.0, 1.0 - (1.0 - total) / (1.0 - joint)))
  j_text, j_map = joint_drop_rates(cond_dropout)
  return (solve(cond_dropout.text_total, j_text), solve(cond_dropout.modality_total, j_map))


def legacy_drop_totals(cond_dropout: dict) -> dict:
  """A saved ``cond_dropout`` dict from before the totals (``text`` and ``modality`` were the
  independent rates) as totals that keep its independent rates (so the run draws the same drops).
  Joint rates it lacks take the schema's defaults, as any field added since a run was saved."""
  out = {**sr_config().cond_dropout.to_dict(), **cond_dropout}
  cfg = ml_collections.ConfigDict({k: out[k] for k in ("all", "all_modalities")})
  j_text, j_map = joint_drop_rates(cfg)
  q_text, q_mod = out.pop("text", 0.0), out.pop("modality", 0.0)
  out["text_total"] = 1.0 - (1.0 - q_text) * (1.0 - j_text)
  out["modality_total"] = 1.0 - (1.0 - q_mod) * (1.0 - j_map)
  return out


def latent_size(config) -> int:
  return config.data.hr_size // config.autoencoder.factor


def token_grid(config) -> int:
  """Side of each modality's VQ id grid."""
  return config.data.map_size // vq_downsample(config.vq.arch)


def validate(config) -> None:
  ck = common.validate_common(config)
  d = config.data
  ck.choice("data.source", SOURCES)
  if d.source != "demo" and not d.path:
    ck.fail("data.path", f"a path (config.data.source={d.source!r} reads from it)")
  ck.integer("data.scale", 1)
  ck.integer("data.hr_size", 1)
  ck.divides("data.hr_size", d.scale, "data.scale")
  ck.integer("data.eval_size", d.scale)
  ck.divides("data.map_size", vq_downsample(config.vq.arch), "the VQ downsampling factor")
  ck.integer("data.min_image_size", 1)
  ck.number("data.max_bad_fraction", 0.0, 1.0)
  ck.integer("data.max_image_pixels", 1, pillow_limit())
  ck.choice("data.degradation", DEGRADATIONS)
  ck.integer("data.prefetch", 0)
  ck.choice("data.maps_from", MAPS_FROM)
  pattern = d.get("caption_from_name", "")
  if pattern:
    try:
      groups = re.compile(pattern).groups
    except (re.error, TypeError):
      groups = -1
    if groups != 1:
      ck.fail("data.caption_from_name", "a regular expression with exactly one group")
  if d.maps_from != "record" and (d.degradation != "simple" or config.vq.ids_from != "encoder"):
    ck.fail("data.maps_from", "'record' unless config.data.degradation='simple' and "
            "config.vq.ids_from='encoder' (operator maps are made per example on the host)")

  ck.integer("text.max_length", 2)
  ck.choice("vq.ids_from", IDS_FROM)
  ck.choice("text.states_from", IDS_FROM)
  ck.choice("autoencoder.hr_latents_from", IDS_FROM)
  for field in ("text.states_from", "autoencoder.hr_latents_from"):
    if ck.get(field) == "shards" and d.source != "arrayrecord":
      ck.fail(field, "'encoder' unless config.data.source='arrayrecord' (features are read from "
              "shards written by python -m mmsr_jax.precompute)")
  if config.vq.ids_from == "shards" and d.source != "arrayrecord":
    ck.fail("vq.ids_from", "'encoder' unless config.data.source='arrayrecord' (ids are read "
            "from shards written by python -m mmsr_jax.precompute --crop_size=...)")

  ck.choice("autoencoder.kind", AUTOENCODERS)
  ae = config.autoencoder
  ck.integer("autoencoder.factor", 1)
  ck.number("autoencoder.scaling_factor", 0.0, lo_open=True)
  if ae.kind == "vae" and 2 ** (len(ae.arch.block_out_channels) - 1) != ae.factor:
    ck.fail("autoencoder.factor", f"{2 ** (len(ae.arch.block_out_channels) - 1)}, the "
            f"downsampling of autoencoder.arch ({len(ae.arch.block_out_channels)} blocks)")
  ck.divides("data.hr_size", ae.factor, "autoencoder.factor")

  m = config.model
  ck.integer("model.patch_size", 1)
  if latent_size(config) % m.patch_size:
    ck.fail("data.hr_size", f"a latent size ({latent_size(config)} px) divisible by "
            f"model.patch_size={m.patch_size}")
  ck.integer("model.num_heads", 1)
  ck.integer("model.context_heads", 1)
  ck.integer("model.width", 4)
  ck.divides("model.width", 4, "2D sin-cos position embeddings")
  ck.divides("model.width", m.num_heads, "model.num_heads")
  ck.divides("model.width", m.context_heads, "model.context_heads")
  ck.integer("model.depth", 1)
  ck.integer("model.context_depth", 1)
  ck.choice("model.remat", REMAT)
  ck.choice("model.attention", ATTENTION)
  ck.integer("model.context_latents", 1)
  if m.get("context_spatial", False):
    dit_grid = latent_size(config) // m.patch_size
    map_grid = token_grid(config)
    if map_grid % dit_grid:
      ck.fail("model.context_spatial", f"False: the {map_grid}x{map_grid} map token grid does "
              f"not pool onto the DiT's {dit_grid}x{dit_grid} token grid")
  if m.get("context_latent_positions", False):
    g = math.isqrt(m.context_latents)
    if g * g != m.context_latents:
      ck.fail("model.context_latents", "a square number (a g x g grid) when "
              "model.context_latent_positions=True")
  ck.number("model.mlp_ratio", 0.0, lo_open=True)
  ck.number("model.pos_interpolation_scale", 0.0, lo_open=True)
  ck.integer("encode_passes", 1)
  if not isinstance(config.get("compiled_step", ""), str):
    ck.fail("compiled_step", "a path written by python -m mmsr_jax.aot --save_executable, or ''")

  ck.integer("diffusion.num_timesteps", 2)
  ck.choice("diffusion.schedule", SCHEDULES)
  ck.number("diffusion.beta_start", 0.0, 1.0, lo_open=True, hi_open=True)
  ck.number("diffusion.beta_end", config.diffusion.beta_start, 1.0, hi_open=True)
  ck.choice("diffusion.prediction", PREDICTIONS)
  ck.number("diffusion.min_snr_gamma", 0.0)
  ck.number("diffusion.residual_scale", 0.0, lo_open=True)
  ck.choice("diffusion.rescale_zero_snr", (True, False))
  if config.diffusion.rescale_zero_snr and config.diffusion.prediction != "v":
    ck.fail("diffusion.rescale_zero_snr", "False unless config.diffusion.prediction='v' (at zero "
            "terminal SNR epsilon says nothing about x0: NaN at t = T-1, min-SNR weight 0/0)")

  ck.number("cond_dropout.modality_total", 0.0, 1.0)
  ck.number("cond_dropout.text_total", 0.0, 1.0)
  ck.number("cond_dropout.all", 0.0, 1.0)
  ck.number("cond_dropout.all_modalities", 0.0, 1.0)
  j_text, j_map = joint_drop_rates(config.cond_dropout)
  # A small tolerance: 1 - 0.9 * 0.95 is 0.14500000000000002 in floating point.
  for field, joint, what in (("text_total", j_text, "config.cond_dropout.all"),
                             ("modality_total", j_map, "1 - (1 - config.cond_dropout.all)"
                              "(1 - config.cond_dropout.all_modalities)")):
    if config.cond_dropout[field] < joint - 1e-9:
      ck.fail(f"cond_dropout.{field}", f"a total drop rate >= {joint:.6g}, the share the joint "
              f"drops alone remove ({what}); lower the joint rates or raise the total")

  ck.integer("sampling.steps", 1, config.diffusion.num_timesteps)
  ck.number("sampling.eta", 0.0, 1.0)
  ck.choice("sampling.spacing", SPACINGS)
  if config.diffusion.rescale_zero_snr and config.sampling.spacing != "trailing":
    # Leading spacing starts at t = T - T/steps + 1 (981 of 1000 at 50 steps), so the sampler
    # never starts from the pure noise the zero-SNR schedule was trained to denoise at T - 1.
    ck.fail("sampling.spacing", "'trailing' when config.diffusion.rescale_zero_snr=True "
            "(leading spacing never visits t = T - 1, where zero-SNR sampling must start)")
  ck.choice("sampling.guidance", GUIDANCE_MODES)
  ck.number("sampling.scale", 0.0)
  ck.number("sampling.clip_x0", 0.0)
  ck.integer("sampling.seed", 0)
  ck.number("sampling.strength", 0.0, 1.0, lo_open=True)
  ck.choice("sampling.text_device", TEXT_DEVICES)
  ck.integer("sampling.max_input_pixels", 1, pillow_limit())
  ck.integer("sampling.max_tiles", 0)
  ck.number("sampling.max_aspect_ratio", 1.0)
  if not isinstance(config.sampling.negative_prompt, str):
    ck.fail("sampling.negative_prompt", "a string")
  ck.choice("eval.sample_ablation", (True, False))
  ck.integer("eval.steps", 1, config.diffusion.num_timesteps)
  ck.number("eval.scale", 0.0)
  ck.integer("eval.val_batches", 1)

  # The frozen components' architectures (a bad one would fail deep inside a model build).
  common.check_conv_arch(ck, "vq.arch")
  ck.integer("vq.arch.num_vq_embeddings", 2)
  ck.integer("vq.arch.vq_embed_dim", 1)
  if ae.kind == "vae":
    common.check_conv_arch(ck, "autoencoder.arch")
  for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance"):
    ck.integer(f"text.encoder.{name}", 1)
  ck.number("text.encoder.layer_norm_epsilon", 0.0, lo_open=True)
