"""The full set of configuration fields, with defaults; ``configs/*.py`` start from here.

Every field a run can read is declared here, so ``--config.some.field=value`` on the command line
is checked against this tree (a field that does not exist is an error before anything starts).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16  # global batch, split over all devices
  c.num_train_steps = 1000
  c.log_every = 25
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.compute_dtype = "float32"  # "bfloat16" on accelerators; master weights stay float32

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1: the devices the other axes leave
  c.mesh.fsdp = 1  # FSDP axis: batch *and* parameters/optimizer/EMA split over it (embed dim)
  c.mesh.tensor = 1  # tensor-parallel axis (heads / mlp dims); the batch is replicated over it

  # Observability (mmsr_jax.loop): TensorBoard scalars under DIR/tensorboard, sample grids every
  # sample_every steps (0 = only the final report), a profiler trace of profile.num_steps steps
  # from profile.start_step under DIR/profile (num_steps 0 = off).
  c.tensorboard = True
  c.sample_every = 0
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10
  c.profile.num_steps = 0
  # Peak FLOP/s per device for the MFU estimate where mmsr_jax.flops does not know the device
  # (e.g. CPU); 0 = use the table (no MFU on unknown devices).
  c.peak_flops = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.decay = "cosine"  # "cosine" or "constant" after warm-up
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip = 1.0
  c.optimizer.ema_decay = 0.9999

  c.data = ml_collections.ConfigDict()
  c.data.source = "demo"
  c.data.hr_size = 512  # training crop (HR pixels)
  c.data.scale = 4
  c.data.map_size = 256  # modality maps fed to the VQ tokenizer
  c.data.eval_size = 512
  c.data.num_workers = 0
  # Sources (mmsr_jax/data/sources.py): "demo", "folder" (images under path, recursive), "tfds"
  # (path = dataset name, e.g. "div2k"), "arrayrecord" (path = mmsr_jax.annotate output).
  c.data.path = ""
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""  # "" = the TFDS default
  c.data.image_key = ""  # TFDS image feature; "" = "hr" if present, else "image"
  c.data.caption_key = ""  # TFDS caption feature; "" = no caption
  c.data.eval_path = ""  # folder of held-out images for the report; "" = the demo photos
  c.data.min_image_size = 64  # smaller images are skipped as bad
  c.data.max_bad_fraction = 0.05  # more bad images than this share stops the run
  # "simple" (one-stage, the tiny demo), "realesrgan" (second order, x4plus ranges) or "seesr".
  c.data.degradation = "simple"
  c.data.prefetch = 2  # batches degraded ahead in a thread (realesrgan / seesr)

  c.text = ml_collections.ConfigDict()
  c.text.tokenizer = "byte"  # "byte" or a local folder / hub id of a transformers tokenizer
  c.text.max_length = 77
  c.text.params = ""  # frozen text-encoder weights (a folder from mmsr_jax.convert); "" = random
  c.text.encoder = ml_collections.ConfigDict(dict(
      vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"))

  c.vq = ml_collections.ConfigDict()
  c.vq.params = ""  # frozen VQGAN weights; "" = random (a trained tokenizer replaces it)
  c.vq.arch = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512),
      layers_per_block=2, latent_channels=256, num_vq_embeddings=1024, vq_embed_dim=256,
      norm_num_groups=32))
  # One tokenizer for all maps (False) or one per modality (True: vq.params holds a tree stacked
  # over (depth, seg, edge)); both are written by python -m mmsr_jax.train_vq.
  c.vq.per_modality = False
  # Where the DiT trainer gets token ids: "encoder" (run the VQ encoder on the maps every step)
  # or "shards": depth / seg ids of the training crops precomputed by python -m mmsr_jax.tokenize
  # --crop_size=<data.hr_size> and read from the records (needs data.source="arrayrecord"; the
  # crop is one of each record's stored boxes). Edge ids are still encoded every step (edges are
  # Canny of the degraded LR), and vq.params must be the tokenizer the shards were written with.
  c.vq.ids_from = "encoder"

  # Training the tokenizer (python -m mmsr_jax.train_vq; see configs/vq_f16.py).
  c.vq_train = ml_collections.ConfigDict(dict(
      source="demo",  # "demo" (+ synthetic maps), "synthetic", or "shards" (annotator output)
      shards="",  # source "shards": a glob or folder of mmsr_jax.annotate ArrayRecord shards
      heldout_every=20,  # source "shards": every n-th record is held out for the report
      synthetic_fraction=0.25,  # chance to use a synthetic map even where a real one exists
      synthetic_for_missing=True,  # fill modalities a record lacks with synthetic maps
      codebook="ema",  # "ema" (moving-average codebook) or "loss" (codebook loss term)
      ema_decay=0.99,
      beta=0.25,  # commitment weight
      codebook_weight=1.0,  # codebook-loss weight (codebook="loss")
      recon_loss="l1",  # "l1" or "l2"
      edge_weight=1.0,  # line pixels of edge maps weigh this many times a background pixel
      perceptual_weight=0.0,  # > 0 needs lpips_params (mmsr_jax.models.lpips weights)
      lpips_net="vgg",
      lpips_params="",
      adv_weight=0.0,  # > 0: hinge patch-discriminator term from disc_start on
      disc_start=0,
      disc_lr=1e-4,
      disc_width=64,
      disc_layers=3,
      usage_decay=0.99,  # EMA of how often each code is picked per step
      restart_every=100,  # dead-code restart period in steps (0 = never)
      restart_threshold=1.0,  # a code picked fewer times per step (EMA) than this is dead
      restart_until=0.8,  # no restarts in the last 20% of training
      restart_noise=0.01,
      continuous_baseline=True,  # also train the same autoencoder without quantisation
      eval_synthetic=24,  # synthetic held-out maps per modality (fixed seed)
      eval_crops=4,  # held-out crops per real held-out image
      png_examples=4,  # examples per modality in reconstructions.png
  ))

  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.kind = "vae"  # "pixel" (space-to-depth) or "vae" (SD-compatible KL-f8)
  c.autoencoder.factor = 8
  c.autoencoder.scaling_factor = 0.18215
  c.autoencoder.shift_factor = 0.0  # latent = (mean - shift) * scale (0 for the SD VAE)
  c.autoencoder.params = ""  # kind 'vae': safetensors of the Flax tree; "" = random init
  # kind 'vae': fields of mmsr_jax.models.vae.VAEConfig (SD KL-f8 by default)
  c.autoencoder.arch = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
      layers_per_block=2, latent_channels=4, norm_num_groups=32))

  c.model = ml_collections.ConfigDict()
  c.model.width = 1024
  c.model.depth = 24
  c.model.num_heads = 16
  c.model.patch_size = 2
  c.model.mlp_ratio = 4.0
  c.model.remat = False
  c.model.context_latents = 128
  c.model.context_depth = 2
  c.model.context_heads = 16
  c.model.init_from = ""  # a folder from mmsr_jax.convert --kind=pixart to start the DiT from

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.prediction = "epsilon"
  c.diffusion.rescale_zero_snr = False
  c.diffusion.min_snr_gamma = 0.0  # 0 disables min-SNR weighting
  # Residual diffusion: diffuse residual_scale * (z_HR - z_LR) instead of z_HR; the sampler adds
  # the LR latent back. The LR latent is still concatenated to the input either way.
  c.diffusion.residual = False
  c.diffusion.residual_scale = 1.0

  c.cond_dropout = ml_collections.ConfigDict()
  c.cond_dropout.modality = 0.1  # each spatial modality -> null block, independently
  c.cond_dropout.text = 0.1  # caption -> empty caption

  c.sampling = ml_collections.ConfigDict()
  c.sampling.steps = 50
  c.sampling.eta = 0.0
  c.sampling.spacing = "leading"
  c.sampling.guidance = "mcfg"
  c.sampling.scale = 2.0
  c.sampling.negative_prompt = ""
  c.sampling.clip_x0 = 0.0  # > 0 clips predicted x0 (pixel autoencoder only)
  c.sampling.seed = 0
  # 1.0 starts DDIM from pure noise; < 1 starts from the upsampled LR noised to strength * T
  # (fewer invented details, more fidelity).
  c.sampling.strength = 1.0
  # Where the frozen text encoder runs while sampling: "accelerator", "cpu" (weights on the host,
  # states computed there once per caption and passed in) or "auto" (cpu above 1 GiB of weights
  # on an accelerator backend, e.g. T5-XXL, so a 2048x2048 dit_l sample fits 16 GiB).
  c.sampling.text_device = "auto"

  c.eval = ml_collections.ConfigDict()
  c.eval.steps = 50
  c.eval.scale = 0.0  # guidance scale for the held-out report (0 = conditional only)
  c.eval.val_batches = 4  # noise draws per held-out example for val_loss
  return c


def full_size_config(*, width: int, depth: int, num_heads: int, lr: float,
                     init_from: str = "") -> ml_collections.ConfigDict:
  """The research configuration of MMSR.md at a given denoiser size (``configs/dit_*.py``).

  SD-compatible KL-f8 VAE, T5 v1.1 XXL (77 tokens), VQGAN f16 tokenizers (256x256 maps -> 16x16
  ids, codebook 1024 x 256), a 128-latent MMLC, 512x512 crops from 128x128 LR, bf16 compute.
  The frozen components are read from the ``weights/`` folders below, written by
  ``python -m mmsr_jax.convert`` (VAE, T5, PixArt) and ``python -m mmsr_jax.train_vq`` (the
  tokenizers); the README lists the commands.
  """
  c = base_config()
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

  c.data.hr_size = 512
  c.data.map_size = 256
  c.data.eval_size = 512
  c.data.degradation = "realesrgan"  # train on e.g. --config.data.source=folder --config.data.path=

  c.text.tokenizer = "weights/t5_v1_1_xxl"  # tokenizer files copied by the converter
  c.text.max_length = 77
  c.text.params = "weights/t5_v1_1_xxl"
  c.text.encoder = dict(
      vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
  c.vq.params = "weights/vqgan_f16_modalities"

  c.autoencoder.kind = "vae"
  c.autoencoder.factor = 8
  c.autoencoder.scaling_factor = 0.18215
  c.autoencoder.params = "weights/sd_vae_ft_ema"

  c.model.width = width
  c.model.depth = depth
  c.model.num_heads = num_heads
  c.model.patch_size = 2
  c.model.remat = True
  c.model.context_latents = 128
  c.model.context_depth = 2
  c.model.context_heads = num_heads
  c.model.init_from = init_from

  c.sampling.steps = 50
  c.sampling.guidance = "mcfg"
  c.sampling.scale = 2.0
  return c
