"""The tiny VQ tokenizer of ``configs/tiny.py`` (32x32 maps -> 8x8 ids, 64 codes x 16 dims),
trained on the demo photos' maps plus synthetic maps.

  python -m mmsr_jax.train_vq --config=configs/vq_tiny.py --workdir=runs/vq_tiny

``runs/vq_tiny/vq.safetensors`` is what ``mmsr_jax/assets/vq_tiny.safetensors`` was copied from;
docs/vq_tokenizers.md has its report ("The shipped tiny tokenizer") and the L1 / L2 sweep
behind the settings ("Why L2").
"""

from configs import tiny
from mmsr_jax.schema.vq import vq_config


def get_config():
  c = vq_config()
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

  c.vq_train.source = "demo"
  c.vq_train.codebook = "ema"
  c.vq_train.recon_loss = "l2"  # with l1 both autoencoders learn blank edge maps
  c.vq_train.restart_every = 50
  c.vq_train.restart_threshold = 1.0
  c.vq_train.eval_synthetic = 32
  c.vq_train.eval_crops = 8
  return c
