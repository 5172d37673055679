"""The super-resolution training task: condition dropout, the diffusion loss of the DiT on
frozen-encoder conditions, AdamW and the EMA, as one jitted, sharded, donated update step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmsr_jax.data import precomputed, sr_eval_examples, sr_examples
from mmsr_jax.diffusion import schedule as diffusion
from mmsr_jax.models.conditioner import Conditioner
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.runtime import executable, sharding
from mmsr_jax.runtime.optimizer import TrainState, ema_decay
from mmsr_jax.schema import sr as sr_schema
from mmsr_jax.schema import tasks
from mmsr_jax.system import System
from mmsr_jax.training import flops, loop, sr_report
from mmsr_jax.weights import pixart


def drop_conditions(cfg, rng, present):
  """Condition dropout of a batch (``cfg`` = ``config.cond_dropout``): ``all`` drops the caption
  and every modality together and ``all_modalities`` every modality (caption kept), so the
  guidance modes' negative branches are trained; on top, each modality is nulled and the caption
  emptied independently, at the rates that make each map's total drop rate ``modality_total``
  and the caption's ``text_total`` (``mmsr_jax.schema.sr.independent_drop_rates``). Returns
  ``(present [B, 3], drop_text [B])``.
  """
  q_text, q_mod = sr_schema.independent_drop_rates(cfg)
  r_mod, r_txt, _ = jax.random.split(rng, 3)
  # The joint drops draw from their own stream, so the independent ones stay as they were.
  r_all, r_all_mod = jax.random.split(jax.random.fold_in(rng, 1), 2)
  b = present.shape[0]
  drop_all = jax.random.bernoulli(r_all, cfg.all, (b,))
  drop_mods = drop_all | jax.random.bernoulli(r_all_mod, cfg.all_modalities, (b,))
  present = (present & ~drop_mods[:, None]
             & jax.random.bernoulli(r_mod, 1.0 - q_mod, present.shape))
  return present, jax.random.bernoulli(r_txt, q_text, (b,)) | drop_all


NULL_TEXT = "null_text"  # the frozen inputs' entry with the empty caption's states and mask


def make_train_step(config, model: MMSR, conditioner: Conditioner, schedule, tx, lr_fn):
  """The update step: frozen encoders (or the batch's precomputed features) -> condition
  dropout -> loss -> AdamW -> EMA. ``frozen[NULL_TEXT]`` holds the empty caption's text states
  ``[L, D]`` and mask ``[L]``, which a dropped caption gets (an input, not a constant of the
  program, so that a program compiled ahead of time is the one training runs)."""
  base_rng = jax.random.key(config.seed)
  min_snr = config.diffusion.min_snr_gamma or None

  def step_fn(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    r_loss = jax.random.split(rng, 3)[2]
    present, drop_text = drop_conditions(config.cond_dropout, rng, batch["present"])
    cond = dict(conditioner(frozen, batch))
    drop = drop_text[:, None]
    null_states, null_mask = frozen[NULL_TEXT]["states"], frozen[NULL_TEXT]["mask"]
    cond["text_states"] = jnp.where(drop[..., None], null_states[None],
                                    cond["text_states"].astype(jnp.float32))
    cond["text_mask"] = jnp.where(drop, null_mask[None], cond["text_mask"])
    cond = jax.lax.stop_gradient(cond)
    x0 = jax.lax.stop_gradient(conditioner.batch_target(frozen, batch, cond["lr_latent"]))

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



def frozen_parts(config) -> tuple[str, ...]:
  """The frozen encoders a train step runs: the VAE (the LR latent) and the VQ tokenizer (the LR
  edges) always; T5 unless the caption states come from the shards."""
  return ("ae", "vq") if config.text.states_from == "shards" else ("ae", "text", "vq")


def jitted_step(system: System, frozen_sharding):
  """The update step of ``system`` jitted with explicit shardings, the state donated."""
  step_fn = make_train_step(system.config, system.model, system.conditioner, system.schedule,
                            system.tx, system.lr_fn)

  def constrained_step(state, frozen, batch):  # activation constraints on while tracing
    with sharding.activation_rules(system.mesh):
      return step_fn(state, frozen, batch)
  return jax.jit(constrained_step,
                 in_shardings=(system.state_sharding, frozen_sharding,
                               sharding.batch_sharding(system.mesh)),
                 out_shardings=(system.state_sharding, sharding.replicated(system.mesh)),
                 donate_argnums=(0,))


def batch_spec(config) -> dict[str, tuple[tuple[int, ...], str]]:
  """The global batch the training loader yields for ``config``: name -> (shape, dtype),
  precomputed features included where the config reads them from shards."""
  b, s, m, n = (config.batch_size, config.data.hr_size, config.data.map_size,
                config.text.max_length)
  lr = s // config.data.scale
  out = {"hr": ((b, s, s, 3), "float32"), "lr": ((b, lr, lr, 3), "float32"),
         "depth": ((b, m, m, 3), "float32"), "seg": ((b, m, m, 3), "float32"),
         "edge": ((b, m, m, 3), "float32"), "present": ((b, 3), "bool"),
         "text_ids": ((b, n), "int32"), "text_mask": ((b, n), "int32")}
  if config.vq.ids_from == "shards":
    out["vq_ids"] = ((b, 3, sr_schema.token_grid(config), sr_schema.token_grid(config)), "int32")
  if config.text.states_from == "shards":
    out["text_states"] = ((b, n, config.text.encoder.d_model), "bfloat16")
  if config.autoencoder.hr_latents_from == "shards":
    lat = s // config.autoencoder.factor
    c = config.autoencoder.arch.latent_channels if config.autoencoder.kind == "vae" else (
        3 * config.autoencoder.factor ** 2)
    out["hr_latent"] = ((b, lat, lat, c), "bfloat16")
  return out


def abstract_step(system: System) -> tuple:
  """The jitted update step of ``system`` and abstract ``(state, frozen, batch)`` carrying their
  shardings: what a run compiles, with nothing allocated and no weights read."""
  config = system.config
  frozen = {p: system.conditioner.abstract_params(p) for p in frozen_parts(config)}
  n, d = config.text.max_length, config.text.encoder.d_model
  frozen[NULL_TEXT] = {"states": jax.ShapeDtypeStruct((n, d), jnp.float32),
                       "mask": jax.ShapeDtypeStruct((n,), jnp.int32)}
  frozen_sh = sharding.frozen_shardings(frozen, system.mesh)
  batch_sh = sharding.batch_sharding(system.mesh)
  with_sh = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=batch_sh)
           for k, (shape, dt) in batch_spec(config).items()}
  return jitted_step(system, frozen_sh), (system.abstract_with_shardings(),
                                          jax.tree.map(with_sh, frozen, frozen_sh), batch)


class SRTask:
  """The super-resolution task of :mod:`mmsr_jax.training.loop`: the system of the config, its
  frozen weights placed on the mesh, the sharded initial state and the jitted update step."""

  def __init__(self, config, workdir: str, devices=None, system: System | None = None,
               null_text: tuple[np.ndarray, np.ndarray] | None = None):
    self.config, self.workdir = config, workdir
    s = System.from_config(config, devices) if system is None else system
    self.system = s
    # Precomputed caption states: the text encoder stays off the accelerators (T5-XXL is 19 GB);
    # only the report loads it (eval_frozen).
    self.text_from_shards = config.text.states_from == "shards"
    loop.log(f"DiT {config.model.width} x {config.model.depth}: attention "
             f"{s.model.attention} (config.model.attention="
             f"{config.model.get('attention')!r}), remat {config.model.remat}, compute "
             f"{config.compute_dtype}; frozen encoders in the step: "
             f"{', '.join(frozen_parts(config))}")
    self.frozen = s.load_frozen(frozen_parts(config))
    self.frozen_sharding = jax.tree.map(lambda a: a.sharding, self.frozen)
    self._init = jax.jit(s.init_fn, out_shardings=s.state_sharding)
    if config.model.init_from:  # read (and checked) before anything long starts
      for warning in pixart.check_converted(config.model.init_from, config):
        loop.log(f"WARNING: {warning}")
      self._pixart = pixart.pixart_for_mmsr(
          config.model.init_from, s.abstract_state.params, num_heads=config.model.num_heads)

      def graft(state, pretrained):
        params = {**state.params, "dit": pretrained["dit"]}
        if "context" in pretrained:
          params["context"] = {**state.params["context"], **pretrained["context"]}
        return TrainState(state.step, params, s.tx.init(params), params)
      self._pretrained = jax.jit(graft, out_shardings=s.state_sharding, donate_argnums=(0,))
    null = null_text or self.null_text()
    self.null = null
    null_tree = {"states": np.asarray(null[0], np.float32), "mask": np.asarray(null[1], np.int32)}
    self.frozen[NULL_TEXT] = sharding.put(
        null_tree, jax.tree.map(lambda _: sharding.replicated(self.mesh), null_tree))
    self.frozen_sharding = jax.tree.map(lambda a: a.sharding, self.frozen)
    self.train_step = jitted_step(s, self.frozen_sharding)
    self._step = None  # what step() runs, chosen at the first step (see _first_step)

  @property
  def mesh(self):  # the task interface of the loop
    return self.system.mesh

  def null_text(self) -> tuple[np.ndarray, np.ndarray]:
    """The empty caption's text states ``[L, D]`` (float32) and mask ``[L]``: written beside the
    shards by the precompute pass, or computed here by the text encoder."""
    if self.text_from_shards:
      return precomputed.read_null_text(self.config)
    ids, mask = self.system.tokenizer.encode("", self.config.text.max_length)
    states = jax.jit(self.system.conditioner.text_states)(self.frozen, ids[None], mask[None])[0]
    return np.asarray(states, np.float32), np.asarray(mask)

  def eval_frozen(self) -> dict:
    """The frozen weights with the text encoder, which the report's held-out examples need (it
    is loaded here, once, when training reads precomputed caption states)."""
    if "text" in self.frozen:
      return self.frozen
    if getattr(self, "_eval_frozen", None) is None:
      self._eval_frozen = {**self.frozen, **self.system.load_frozen(("text",))}
    return self._eval_frozen

  # --- The task interface of the loop.
  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    if self._step is None:
      self._step = self._first_step(state, batch)
    return self._step(state, self.frozen, batch)

  def _first_step(self, state: TrainState, batch):
    """The step to run: the executable at ``config.compiled_step`` when it was compiled for
    this very program on these devices, else the jitted step (compiled now by its first call)."""
    path = self.config.get("compiled_step", "")
    if not path:
      return self.train_step
    lowered = self.train_step.lower(state, self.frozen, batch)
    loaded = executable.load(path, lowered, list(self.mesh.devices.flat), loop.log)
    if loaded is None:
      return lowered.compile()
    loop.log(f"compiled step {path}: loaded, compile skipped")
    return loaded

  def make_loader(self):
    return sr_examples.make_train_loader(self.config, self.system.tokenizer)

  def write_report(self, workdir: str, state: TrainState) -> dict:
    return sr_report.write_report(self.config, workdir, self, state)

  def init_state(self) -> TrainState:
    """A fresh state; with ``config.model.init_from``, the DiT and text projection come from
    converted PixArt weights (EMA equal to them, optimizer moments zero)."""
    state = self._init(jax.random.key(self.config.seed))
    if self.config.model.init_from:
      state = self._pretrained(state, self._pixart)
    return state

  def flops_per_step(self) -> float:
    """Model FLOPs of one update step (trainable MMSR, forward + backward), for MFU."""
    return flops.mmsr_train_flops_per_step(self.config)

  def sample_grid(self, state: TrainState) -> dict:
    """``LR | bicubic | SR (EMA weights) | HR`` of each held-out crop, for TensorBoard."""
    if not hasattr(self, "_eval_examples"):
      self._eval_examples = sr_eval_examples.make_eval_examples(
          self.config, self.system.tokenizer, "val")
    c = self.config
    sr = sr_report.super_resolve(c, self, state.ema_params, self._eval_examples,
                                 steps=c.eval.steps, scale=c.eval.scale,
                                 guidance=c.sampling.guidance, strength=c.sampling.strength,
                                 seed=c.sampling.seed)["all"]
    return {ex["name"]: sr_report.example_grid(ex, sr_u8)
            for ex, sr_u8 in zip(self._eval_examples, sr)}

  def abstract_with_shardings(self):
    return self.system.abstract_with_shardings()


def train(config, workdir: str, *, devices=None, stop_at: int | None = None,
          write_report: bool = True, restore_step: int | None = None) -> TrainState:
  """Trains to ``config.num_train_steps`` (or stops after ``stop_at``, saving a checkpoint)."""
  tasks.validate(config)
  loop.check_workdir(config, workdir)
  return loop.run(SRTask(config, workdir, devices), workdir, stop_at=stop_at,
                  write_report=write_report, restore_step=restore_step)
