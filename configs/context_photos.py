"""The context experiment on real photos: does the context (caption, depth, segmentation, edge
maps) make a better super-resolver when the maps carry detail the LR lacks?

  python -m mmsr_jax.train --config=configs/context_photos.py --workdir=runs/ctx_hr_s0
  python -m mmsr_jax.train --config=configs/context_photos.py --workdir=runs/ctx_lr_s0 \\
      --config.data.maps_from=lr

64-pixel HR crops of the scene photos (x4: 16-pixel LR), the depth / seg / edge maps made by
fixed operators at full crop resolution from the HR crop (``maps_from='hr'``, the oracle) or from
the degraded LR (``'lr'``, as inference would), 16x16 tokens of the tokenizer that
``configs/vq_context_photos.py`` trains, the scene category of each file name as its caption.
docs/context_experiment.md has the measured comparison and its command.
"""

from configs import vq_context_photos as vq
from mmsr_jax.schema.sr import sr_config


def get_config():
  c = sr_config()
  c.batch_size = 8
  c.num_train_steps = 1500
  c.log_every = 50
  c.checkpoint_every = 250
  c.keep_checkpoints = 6  # every checkpoint, for the x0 error by step (context_study --x0_by_step)
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 50
  c.optimizer.ema_decay = 0.99

  c.data.source = "folder"
  c.data.path = vq.TRAIN_PHOTOS
  c.data.caption_from_name = r"^(.+?)_sun_"  # abbey_sun_xyz.jpg -> "abbey"
  c.data.eval_path = vq.HELDOUT_PHOTOS  # no captions there: the text group is empty
  c.data.hr_size = vq.CROP
  c.data.eval_size = vq.CROP
  c.data.map_size = vq.CROP
  c.data.maps_from = "hr"
  c.data.degradation = "simple"

  c.text.max_length = 32
  c.vq.arch = vq.arch()
  c.vq.params = "runs/vq_context/vq.safetensors"

  c.autoencoder.kind = "pixel"
  c.autoencoder.factor = 4
  c.autoencoder.scaling_factor = 1.0

  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.patch_size = 2
  c.model.context_latents = 64
  c.model.context_depth = 2
  c.model.context_heads = 4
  # Each place's map tokens also go straight to the DiT token over it (model.context_spatial).
  # Through the paper's connector alone (free latents, or latents tied to places with
  # model.context_latent_positions) runs of this length learned no use of the maps: its
  # attention over the 800 context tokens still averaged them away (docs/context_experiment.md).
  c.model.context_spatial = True

  # Residual diffusion (docs/tiny_demo.md); v prediction at zero terminal SNR, so at t = T - 1
  # the input is pure noise and the x0 the model predicts is what the LR and the context say.
  c.diffusion.residual = True
  c.diffusion.residual_scale = 4.0
  c.diffusion.prediction = "v"
  c.diffusion.rescale_zero_snr = True
  c.sampling.spacing = "trailing"

  # The no-context branch is a setting of the same model, so it must be trained as well.
  c.cond_dropout.modality_total = 0.3
  c.cond_dropout.text_total = 0.3
  c.cond_dropout.all = 0.15
  c.cond_dropout.all_modalities = 0.05

  # The training report samples fidelity-first (cheap); the experiment's own evaluation
  # (python -m mmsr_jax.context_study) also samples as the paper does.
  c.sampling.steps = 10
  c.sampling.strength = 0.2
  c.sampling.clip_x0 = 8.0  # the residual's valid range: 4 * 2
  c.eval.steps = 10
  c.eval.val_batches = 1
  return c
