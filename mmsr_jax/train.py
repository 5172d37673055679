r"""Trains MMSR: ``python -m mmsr_jax.train --config=configs/tiny.py --workdir=DIR``.

One readable trainer in the big_vision manner: config -> mesh -> input -> model -> sharded state
-> jitted update step; the loop with logging, checkpoints and the held-out report is
``mmsr_jax.loop`` (shared with the VQ tokenizer trainer). Resume is the
default: a workdir that holds checkpoints continues from the newest one (same data position,
same RNG stream, so the result equals an uninterrupted run).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.training import loop
from mmsr_jax.training import flops as flops_lib
from mmsr_jax.training import sr_report as report_lib
from mmsr_jax.runtime import sharding
from mmsr_jax.data import simple_degradation as degrade, sr_examples as pipeline
from mmsr_jax.models.context import SPATIAL_MODALITIES
from mmsr_jax.weights import pixart as pixart_import
from mmsr_jax.models.mmsr import MMSR, Conditioner, build_model
from mmsr_jax.data.captions import make_tokenizer


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  oc = config.optimizer
  warmup = max(1, min(oc.warmup_steps, config.num_train_steps))
  if oc.decay == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, oc.lr, warmup, max(config.num_train_steps, warmup + 1),
        end_value=oc.lr * oc.final_lr_fraction)
  elif oc.decay == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, oc.lr, warmup), optax.constant_schedule(oc.lr)], [warmup])
  else:
    raise ValueError(f"config.optimizer.decay={oc.decay!r}: expected cosine or constant")
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip) if oc.grad_clip > 0 else optax.identity(),
      optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay))
  return tx, lr


def dummy_inputs(config, conditioner: Conditioner, batch: int = 1):
  """Zero inputs of the right shapes for ``MMSR.init``."""
  lat = config.data.hr_size // conditioner.autoencoder.downsample
  c = conditioner.autoencoder.latent_channels
  grid = config.data.map_size // conditioner.vq_downsample
  return (jnp.zeros((batch, lat, lat, c)), jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, lat, lat, c)),
          jnp.zeros((batch, config.text.max_length, config.text.encoder.d_model)),
          jnp.ones((batch, config.text.max_length), jnp.int32),
          jnp.zeros((batch, len(SPATIAL_MODALITIES), grid, grid), jnp.int32),
          jnp.ones((batch, len(SPATIAL_MODALITIES)), bool))


def ema_decay(config, step):
  """EMA decay with warm-up: ``min(decay, (1 + step) / (10 + step))``."""
  step = step.astype(jnp.float32)
  return jnp.minimum(config.optimizer.ema_decay, (1.0 + step) / (10.0 + step))


def make_train_step(config, model: MMSR, conditioner: Conditioner, schedule, tx, lr_fn,
                    empty_text: tuple[np.ndarray, np.ndarray]):
  """The update step: frozen encoders -> condition dropout -> loss -> AdamW -> EMA."""
  base_rng = jax.random.key(config.seed)
  p_mod, p_txt = config.cond_dropout.modality, config.cond_dropout.text
  min_snr = config.diffusion.min_snr_gamma or None

  def step_fn(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    r_mod, r_txt, r_loss = jax.random.split(rng, 3)
    b = batch["hr"].shape[0]
    present = batch["present"] & jax.random.bernoulli(r_mod, 1.0 - p_mod, batch["present"].shape)
    drop_text = jax.random.bernoulli(r_txt, p_txt, (b,))[:, None]
    batch = dict(batch,
                 text_ids=jnp.where(drop_text, empty_text[0][None], batch["text_ids"]),
                 text_mask=jnp.where(drop_text, empty_text[1][None], batch["text_mask"]))
    cond = jax.lax.stop_gradient(conditioner(frozen, batch))
    x0 = jax.lax.stop_gradient(
        conditioner.diffusion_target(frozen, batch["hr"], cond["lr_latent"]))

    def loss_fn(params):
      ctx = model.apply({"params": params}, cond["text_states"], cond["text_mask"], cond["ids"],
                        present, method=MMSR.encode_context)
      apply = lambda z, t: model.apply({"params": params}, z, t, cond["lr_latent"], ctx,  # noqa: E731
                                       method=MMSR.denoise)
      loss, _ = diffusion.diffusion_loss(schedule, apply, x0, r_loss, min_snr_gamma=min_snr)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "lr": lr_fn(state.step)}
    return TrainState(state.step + 1, params, opt_state, ema), metrics

  return step_fn


def create_state_fn(config, model, conditioner, tx):
  """``init(rng) -> TrainState`` (params unboxed) and the boxed abstract params for shardings."""
  inputs = dummy_inputs(config, conditioner)

  def init(rng):
    params = nn.unbox(model.init(rng, *inputs)["params"])
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), params)

  boxed = jax.eval_shape(lambda r: model.init(r, *inputs)["params"], jax.random.key(0))
  return init, boxed


def state_shardings(init, boxed_params, tx, mesh):
  abstract = jax.eval_shape(init, jax.random.key(0))
  p_sh = sharding.param_shardings(boxed_params, mesh)
  return TrainState(step=sharding.replicated(mesh), params=p_sh,
                    opt_state=sharding.opt_state_shardings(tx, abstract.opt_state, p_sh, mesh),
                    ema_params=p_sh), abstract


class Trainer:
  """Everything a run builds once: mesh, model, frozen encoders, sharded state, jitted step."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    # --- Mesh.
    self.mesh = sharding.make_mesh(config, devices)
    # --- Model and frozen encoders.
    self.model = build_model(config)
    self.conditioner = Conditioner.from_config(config)
    self.schedule = diffusion.Schedule.from_config(config.diffusion)
    self.tokenizer = make_tokenizer(config.text.tokenizer)
    self.tx, self.lr_fn = make_optimizer(config)
    repl = sharding.replicated(self.mesh)
    frozen = self.conditioner.init_params(config, jax.random.key(config.seed + 1))
    self.frozen_sharding = sharding.frozen_shardings(frozen, self.mesh)
    self.frozen = sharding.put(frozen, self.frozen_sharding)
    del frozen
    # --- Sharded state, created already placed.
    init, boxed = create_state_fn(config, self.model, self.conditioner, self.tx)
    self.state_sharding, self.abstract_state = state_shardings(init, boxed, self.tx, self.mesh)
    self._init = jax.jit(init, out_shardings=self.state_sharding)
    if config.model.init_from:  # read (and checked) before anything long starts
      self._pixart = pixart_import.pixart_for_mmsr(
          config.model.init_from, self.abstract_state.params, num_heads=config.model.num_heads)

      def graft(state, pretrained):
        params = {**state.params, "dit": pretrained["dit"]}
        if "context" in pretrained:
          params["context"] = {**state.params["context"], **pretrained["context"]}
        return TrainState(state.step, params, self.tx.init(params), params)
      self._pretrained = jax.jit(graft, out_shardings=self.state_sharding, donate_argnums=(0,))
    # --- Update step.
    empty = self.tokenizer.encode("", config.text.max_length)
    step_fn = make_train_step(config, self.model, self.conditioner, self.schedule, self.tx,
                              self.lr_fn, empty)

    def constrained_step(state, frozen, batch):  # activation constraints on while tracing
      with sharding.activation_rules(self.mesh):
        return step_fn(state, frozen, batch)
    self.train_step = jax.jit(
        constrained_step,
        in_shardings=(self.state_sharding, self.frozen_sharding,
                      sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_sharding, repl), donate_argnums=(0,))

  # --- The task interface of ``mmsr_jax.loop``.
  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    return self.train_step(state, self.frozen, batch)

  def make_loader(self):
    return pipeline.make_train_loader(self.config, self.tokenizer)

  def write_report(self, workdir: str, state: TrainState) -> dict:
    return report_lib.write_report(self.config, workdir, self, state)

  def init_state(self) -> TrainState:
    """A fresh state; with ``config.model.init_from``, the DiT and text projection come from
    converted PixArt weights (EMA equal to them, optimizer moments zero)."""
    state = self._init(jax.random.key(self.config.seed))
    if self.config.model.init_from:
      state = self._pretrained(state, self._pixart)
    return state

  def flops_per_step(self) -> float:
    """Model FLOPs of one update step (trainable MMSR, forward + backward), for MFU."""
    return flops_lib.mmsr_train_flops_per_step(self.config)

  def sample_grid(self, state: TrainState) -> dict:
    """``LR | bicubic | SR (EMA weights) | HR`` of each held-out crop, for TensorBoard."""
    if not hasattr(self, "_eval_examples"):
      self._eval_examples = pipeline.make_eval_examples(self.config, self.tokenizer, "val")
    c = self.config
    sr = report_lib.super_resolve(c, self, state.ema_params, self._eval_examples,
                                  steps=c.eval.steps, scale=c.eval.scale,
                                  guidance=c.sampling.guidance, strength=c.sampling.strength,
                                  seed=c.sampling.seed)
    grids = {}
    for ex, sr_u8 in zip(self._eval_examples, sr):
      hr_u8, lr_u8 = report_lib.to_uint8(ex["hr"]), report_lib.to_uint8(ex["lr"])
      bic_u8 = degrade.bicubic_upsample(lr_u8, hr_u8.shape[:2])
      grids[ex["name"]] = report_lib.grid_image(lr_u8, bic_u8, sr_u8, hr_u8)
    return grids

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)


def train(config, workdir: str, *, devices=None, stop_at: int | None = None,
          write_report: bool = True) -> TrainState:
  """Trains to ``config.num_train_steps`` (or stops after ``stop_at``, saving a checkpoint)."""
  loop.check_workdir(config, workdir)
  return loop.run(Trainer(config, workdir, devices), workdir, stop_at=stop_at,
                  write_report=write_report)


# ---------------------------------------------------------------------------------------------
main = loop.main(train)


def define_flags() -> None:
  loop.define_flags("configs/tiny.py", "Directory for checkpoints, logs and the report.")


if __name__ == "__main__":
  from mmsr_jax import cli
  cli.run(main, define_flags)
