"""The VQ tokenizer task's config schema (``python -m mmsr_jax.train_vq``) and its checks."""

from __future__ import annotations

import ml_collections

from mmsr_jax.schema import common

TASK = "vq"
SOURCES = ("demo", "synthetic", "shards", "folder")
CODEBOOKS = ("ema", "loss")
RECON_LOSSES = ("l1", "l2")
LPIPS_NETS = ("alex", "vgg")
# Fields that fix the shapes of the saved state: a resume must not change them.
ARCH_FIELDS = ("vq.arch", "vq.per_modality", "data.map_size", "vq_train.codebook",
               "vq_train.continuous_baseline", "vq_train.adv_weight", "vq_train.disc_width",
               "vq_train.disc_layers")


def vq_arch(**overrides) -> ml_collections.ConfigDict:
  """A VQGAN architecture (``mmsr_jax.models.vqgan.VQGANConfig`` fields): the f16 tokenizer,
  256x256 maps -> 16x16 ids, codebook 1024 x 256."""
  arch = dict(in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512),
              layers_per_block=2, latent_channels=256, num_vq_embeddings=1024, vq_embed_dim=256,
              norm_num_groups=32)
  return ml_collections.ConfigDict(dict(arch, **overrides))


def vq_config() -> ml_collections.ConfigDict:
  c = common.common_config()
  c.task = TASK
  c.vq = ml_collections.ConfigDict()
  c.vq.arch = vq_arch()
  c.vq.per_modality = False  # one tokenizer per modality (a tree stacked over depth, seg, edge)
  c.vq_train = ml_collections.ConfigDict(dict(
      source="demo",  # "demo" (+ synthetic maps), "synthetic", or "shards" (annotator output)
      shards="",  # source "shards": a folder or glob of mmsr_jax.annotate shards
      # source "folder": operator maps (data.modalities.operator_maps) of crop_size crops of the
      # photos under path; the report's held-out maps come from the photos under eval_path.
      path="",
      eval_path="",
      crop_size=0,  # 0 = data.map_size; the SR config's data.hr_size when maps are made at it
      lr_fraction=0.0,  # chance to make the maps from the crop degraded x scale (maps_from='lr')
      scale=4,
      heldout_every=20,  # source "shards": every n-th record is held out for the report
      synthetic_fraction=0.25,  # chance to use a synthetic map where a real one exists
      synthetic_for_missing=True,  # fill modalities a record lacks with synthetic maps
      codebook="ema",  # moving-average codebook, or "loss" (codebook loss term)
      ema_decay=0.99,
      beta=0.25,  # commitment weight
      codebook_weight=1.0,  # codebook="loss"
      recon_loss="l2",  # l1 learns blank edge maps (docs/vq_tokenizers.md, "Why L2")
      edge_weight=1.0,  # line pixels of edge maps weigh this many times a background pixel
      perceptual_weight=0.0,  # > 0 needs lpips_params
      lpips_net="vgg",
      lpips_params="",
      adv_weight=0.0,  # > 0: hinge patch-discriminator term from disc_start on
      disc_start=0,
      disc_lr=1e-4,
      disc_width=64,
      disc_layers=3,
      usage_decay=0.99,  # EMA of how often each code is picked per step
      restart_every=100,  # dead-code restart period in steps (0 = never)
      restart_threshold=1.0,  # codes picked less often than this (EMA, per step) are dead
      restart_until=0.8,  # no restarts in the last 20% of training
      restart_noise=0.01,
      continuous_baseline=True,  # also train the same autoencoder without quantisation
      eval_synthetic=24,  # synthetic held-out maps per modality
      eval_crops=4,  # held-out crops per real held-out image
      png_examples=4,  # examples per modality in reconstructions.png
      # Edge F1 of the report: a line pixel counts within this many pixels (0: exact pixels,
      # right for tiny maps, where one pixel is a large share of the map).
      edge_tolerance=0,
  ))
  return c


def vq_downsample(arch) -> int:
  return 2 ** (len(arch.block_out_channels) - 1)


def validate(config) -> None:
  ck = common.validate_common(config)
  common.check_conv_arch(ck, "vq.arch")
  ck.integer("vq.arch.num_vq_embeddings", 2)
  ck.integer("vq.arch.vq_embed_dim", 1)
  ck.divides("data.map_size", vq_downsample(config.vq.arch), "the VQ downsampling factor")
  vt = "vq_train."
  ck.choice(vt + "source", SOURCES)
  if config.vq_train.source == "shards" and not config.vq_train.shards:
    ck.fail(vt + "shards", "a folder or glob of annotator shards (vq_train.source='shards')")
  if config.vq_train.source == "folder":
    for field in ("path", "eval_path"):
      if not config.vq_train[field]:
        ck.fail(vt + field, "a folder of photos (vq_train.source='folder')")
  ck.integer(vt + "crop_size", 0)
  ck.number(vt + "lr_fraction", 0.0, 1.0)
  ck.integer(vt + "scale", 1)
  ck.integer(vt + "edge_tolerance", 0)
  ck.integer(vt + "heldout_every", 2)
  ck.number(vt + "synthetic_fraction", 0.0, 1.0)
  ck.choice(vt + "codebook", CODEBOOKS)
  ck.number(vt + "ema_decay", 0.0, 1.0, hi_open=True)
  ck.number(vt + "beta", 0.0)
  ck.number(vt + "codebook_weight", 0.0)
  ck.choice(vt + "recon_loss", RECON_LOSSES)
  ck.number(vt + "edge_weight", 1.0)
  ck.number(vt + "perceptual_weight", 0.0)
  ck.choice(vt + "lpips_net", LPIPS_NETS)
  if config.vq_train.perceptual_weight > 0 and not config.vq_train.lpips_params:
    ck.fail(vt + "lpips_params", "LPIPS weights (safetensors, python -m mmsr_jax.metric_weights) "
            "when vq_train.perceptual_weight > 0")
  ck.number(vt + "adv_weight", 0.0)
  ck.integer(vt + "disc_start", 0)
  ck.number(vt + "disc_lr", 0.0, lo_open=True)
  ck.integer(vt + "disc_width", 1)
  ck.integer(vt + "disc_layers", 1)
  ck.number(vt + "usage_decay", 0.0, 1.0, hi_open=True)
  ck.integer(vt + "restart_every", 0)
  ck.number(vt + "restart_threshold", 0.0)
  ck.number(vt + "restart_until", 0.0, 1.0)
  ck.number(vt + "restart_noise", 0.0)
  ck.integer(vt + "eval_synthetic", 0)
  ck.integer(vt + "eval_crops", 1)
  ck.integer(vt + "png_examples", 0)
