"""The VQGAN f16 modality tokenizer of MMSR: 256x256 maps -> 16x16 ids, codebook 1024 x 256.

  python -m mmsr_jax.train_vq --config=configs/vq_f16.py --workdir=runs/vq_f16 \
      --config.vq_train.shards=DIR_OF_ANNOTATOR_SHARDS

One tokenizer for depth, segmentation and edges (``--config.vq.per_modality=True``: one each),
L2 reconstruction, EMA codebook with dead-code restart, a hinge patch discriminator from step 20k;
the continuous baseline trains beside it. Untrained so far (README: Status).
"""

from mmsr_jax.schema.vq import vq_config


def get_config():
  c = vq_config()
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

  c.vq_train.source = "shards"
  c.vq_train.shards = "data/annotations"
  c.vq_train.heldout_every = 50
  c.vq_train.synthetic_fraction = 0.1
  c.vq_train.codebook = "ema"
  c.vq_train.recon_loss = "l2"
  c.vq_train.adv_weight = 0.1
  c.vq_train.disc_start = 20_000
  c.vq_train.restart_every = 500
  c.vq_train.eval_synthetic = 32
  return c
