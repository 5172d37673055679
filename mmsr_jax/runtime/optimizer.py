"""The train state, AdamW with warm-up and decay, and the EMA of the weights (every task)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (global-norm clipped) with linear warm-up, then cosine decay or a constant rate."""
  oc = config.optimizer
  warmup = max(1, min(oc.warmup_steps, config.num_train_steps))
  if oc.decay == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, oc.lr, warmup, max(config.num_train_steps, warmup + 1),
        end_value=oc.lr * oc.final_lr_fraction)
  else:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, oc.lr, warmup), optax.constant_schedule(oc.lr)], [warmup])
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip) if oc.grad_clip > 0 else optax.identity(),
      optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay))
  return tx, lr


def ema_decay(config, step):
  """EMA decay with warm-up: ``min(decay, (1 + step) / (10 + step))``."""
  step = step.astype(jnp.float32)
  return jnp.minimum(config.optimizer.ema_decay, (1.0 + step) / (10.0 + step))
