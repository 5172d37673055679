"""The patch discriminator of the VQ tokenizer's adversarial term (its hinge losses are in
``mmsr_jax/training/vq_losses.py``)."""

from __future__ import annotations

import flax.linen as nn
import jax


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (Isola et al. 2017; the one taming-transformers' VQGAN uses).

  Strided 4x4 convolutions with LeakyReLU(0.2); normalisation is GroupNorm (batch statistics
  would couple the examples of a data-parallel batch). Output: one logit per patch.
  """

  width: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Conv(self.width, (4, 4), strides=2, padding=1)(x)
    h = nn.leaky_relu(h, 0.2)
    ch = self.width
    for i in range(1, self.num_layers + 1):
      ch = self.width * min(2 ** i, 8)
      stride = 2 if i < self.num_layers else 1
      h = nn.Conv(ch, (4, 4), strides=stride, padding=1, use_bias=False)(h)
      h = nn.GroupNorm(num_groups=min(32, ch // 4))(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), strides=1, padding=1)(h)
