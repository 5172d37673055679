"""VQGAN f16 modality tokenizer of MMSR: 256x256 maps -> 16x16 ids, codebook 1024 x 256.

  python -m mmsr_jax.train_vq --config=configs/vq_f16.py --workdir=runs/vq_f16 \
      --config.vq_train.shards=DIR_OF_ANNOTATOR_SHARDS

Trains on the depth / segmentation / edge maps of ``python -m mmsr_jax.annotate`` shards (every
``heldout_every``-th record held out for the report), with 10% synthetic maps mixed in and
synthetic maps filling modalities a record lacks. One tokenizer for all three modalities;
``--config.vq.per_modality=True`` trains one per modality (a stacked tree, same step). L2
reconstruction (with L1 the tiny tokenizer learned to draw no edges: see configs/vq_tiny.py) +
commitment (beta 0.25) with EMA codebook updates and dead-code restart, plus a hinge
patch-discriminator term from step 20k (after taming-transformers, whose recipe uses L1; without
the adaptive weight); LPIPS perceptual term with ``--config.vq_train.perceptual_weight=1.0
--config.vq_train.lpips_params=PATH``. The continuous baseline (same autoencoder, no quantiser)
trains alongside; ``DIR/report.json`` compares the two on the held-out maps, and
``DIR/vq.safetensors`` is the tokenizer for ``config.vq.params``.

No result is claimed for this configuration yet (it needs an accelerator and annotated data); the
tiny one (``configs/vq_tiny.py``) is measured in the README.
"""

from mmsr_jax.config.base import base_config


def get_config():
  c = base_config()
  c.batch_size = 64
  c.num_train_steps = 100_000
  c.log_every = 100
  c.checkpoint_every = 2_000
  c.compute_dtype = "bfloat16"
  c.optimizer.lr = 2e-4
  c.optimizer.warmup_steps = 1_000
  c.optimizer.b1 = 0.5
  c.optimizer.b2 = 0.9
  c.optimizer.weight_decay = 0.0
  c.data.map_size = 256
  # c.vq.arch: the base default is already the f16 VQGAN (128,128,256,256,512), 1024 x 256.
  c.vq.params = ""

  c.vq_train.source = "shards"
  c.vq_train.shards = "data/annotations"
  c.vq_train.heldout_every = 50
  c.vq_train.synthetic_fraction = 0.1
  c.vq_train.codebook = "ema"
  c.vq_train.recon_loss = "l2"  # L1 learns blank edge maps (measured on configs/vq_tiny.py)
  c.vq_train.adv_weight = 0.1
  c.vq_train.disc_start = 20_000
  c.vq_train.restart_every = 500
  c.vq_train.eval_synthetic = 32
  return c
