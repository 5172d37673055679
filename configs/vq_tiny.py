"""Tiny VQ tokenizer for the CPU demo: the f4 VQGAN of ``configs/tiny.py`` (32x32 maps -> 8x8 ids,
64 codes x 16 dims), trained on the demo photos' maps plus synthetic maps.

  python -m mmsr_jax.train_vq --config=configs/vq_tiny.py --workdir=runs/vq_tiny

``runs/vq_tiny/vq.safetensors`` is what ``mmsr_jax/assets/vq_tiny.safetensors`` was copied from
(1500 steps at about 26 steps/s on an H200 shared by six such runs; the README has the report
and the sweep behind the settings). Override any field, e.g. ``--config.num_train_steps=100``.

Reconstruction loss: a sweep of L1 / L2 x ``vq_train.edge_weight`` 1 / 4 / 8 (1500 steps each)
found that with L1 and uniform weights both the VQ and the continuous autoencoder draw no edges at
all (edge F1 0, held-out edge PSNR 9.35 dB, below the best constant map's 9.87 dB), while L2
reconstructs them (13.27 dB, F1 0.69) and is also best on depth and segmentation. Edge weights > 1
raise edge recall but cost PSNR; they stay at 1 here.
"""

from configs import tiny
from mmsr_jax.config.base import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.batch_size = 8  # x 3 maps per example
  c.num_train_steps = 1500
  c.log_every = 50
  c.checkpoint_every = 250
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0

  t = tiny.get_config()
  c.data.map_size = t.data.map_size
  c.vq.arch = t.vq.arch.to_dict()
  c.vq.params = ""

  c.vq_train.source = "demo"
  c.vq_train.codebook = "ema"
  # L2, not L1: with L1 both autoencoders learn to draw no edges at all (see the docstring).
  c.vq_train.recon_loss = "l2"
  c.vq_train.restart_every = 50
  c.vq_train.restart_threshold = 1.0
  c.vq_train.eval_synthetic = 32
  c.vq_train.eval_crops = 8
  return c
