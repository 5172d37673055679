"""The modality tokenizer of the context experiment (``configs/context_photos.py``): 64-pixel
operator maps -> 16x16 ids (f4), 1024 codes, trained on the maps of 64-pixel crops of the
scene photos, the held-out maps from the other photo set.

  python -m mmsr_jax.train_vq --config=configs/vq_context_photos.py --workdir=runs/vq_context

docs/context_experiment.md has the measured report and why it is sized so.
"""

from mmsr_jax.schema.vq import vq_arch, vq_config

TRAIN_PHOTOS = "../shared/data/photos/sun_hays80"
HELDOUT_PHOTOS = "../shared/data/photos/cbsd68"
CROP = 64  # the SR model's HR crop: the maps are made at full crop resolution


def arch():
  """The tokenizer's architecture, which the SR config repeats (its ids are the model's input)."""
  return vq_arch(block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=16,
                 vq_embed_dim=16, num_vq_embeddings=1024, norm_num_groups=4)


def get_config():
  c = vq_config()
  c.seed = 0
  c.batch_size = 6  # x 3 maps per example
  c.num_train_steps = 400
  c.log_every = 10
  c.checkpoint_every = 100
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.0

  c.data.map_size = CROP
  c.vq.arch = arch()

  vt = c.vq_train
  vt.source = "folder"
  vt.path = TRAIN_PHOTOS
  vt.eval_path = HELDOUT_PHOTOS
  vt.crop_size = CROP
  vt.lr_fraction = 0.25  # the realistic condition's maps (from the degraded LR) too
  vt.scale = 4
  vt.codebook = "ema"
  vt.recon_loss = "l2"  # docs/vq_tokenizers.md, "Why L2"
  vt.restart_every = 50
  vt.restart_threshold = 1.0
  vt.continuous_baseline = False  # halves the CPU time; the tokens are what the SR model sees
  vt.eval_crops = 2
  vt.edge_tolerance = 1
  return c
