"""Discrete-time diffusion: beta schedules, the training loss and the DDIM loop.

Conventions of DDPM / DDIM and diffusers: ``t = 0 .. T-1``, ``alpha_bar`` the cumulative product
of ``1 - beta``, ``x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps``; the model predicts ``eps`` or
``v = sqrt(ab) eps - sqrt(1 - ab) x_0``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.diffusion import guidance
from mmsr_jax.schema.choices import PREDICTIONS, SCHEDULES, SPACINGS  # noqa: F401 (its API)

def make_betas(schedule: str, num_timesteps: int, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> np.ndarray:
  """Beta schedules: ``scaled_linear`` (Stable Diffusion / PixArt), ``linear``, ``cosine``."""
  if schedule == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if schedule == "cosine":  # Nichol & Dhariwal, s = 0.008, betas capped at 0.999
    f = lambda t: np.cos((t / num_timesteps + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(num_timesteps, dtype=np.float64)
    return np.minimum(1 - f(t + 1) / f(t), 0.999)
  raise ValueError(f"config.diffusion.schedule={schedule!r}: expected scaled_linear, linear or "
                   "cosine")


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
  """Shifts and scales sqrt(alpha_bar) so that the last step has SNR exactly 0 (Lin et al.)."""
  s = np.sqrt(alphas_cumprod)
  s0, s_last = s[0], s[-1]
  s = (s - s_last) * s0 / (s0 - s_last)
  return s ** 2


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The fixed quantities of one noise schedule (a static, hashable object)."""

  alphas_cumprod: tuple[float, ...]
  prediction: str = "epsilon"

  @classmethod
  def from_config(cls, cfg) -> "Schedule":
    if cfg.rescale_zero_snr and cfg.prediction != "v":  # alpha_bar(T-1) = 0: eps -> x0 is 0/0
      raise ValueError("config.diffusion.rescale_zero_snr=True needs config.diffusion.prediction"
                       f"='v' (got {cfg.prediction!r}: epsilon cannot give x0 at zero SNR)")
    betas = make_betas(cfg.schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    ab = np.cumprod(1.0 - betas)
    if cfg.rescale_zero_snr:
      ab = rescale_zero_terminal_snr(ab)
    return cls(tuple(float(a) for a in ab), cfg.prediction)

  @property
  def num_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  def ab(self, t):
    return jnp.asarray(self.alphas_cumprod, jnp.float32)[t]

  def add_noise(self, x0, noise, t):
    ab = self.ab(t).reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise

  def target(self, x0, noise, t):
    if self.prediction == "epsilon":
      return noise
    ab = self.ab(t).reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0

  def to_x0_eps(self, model_out, x_t, t):
    """Converts a model output at ``x_t`` into the implied ``(x0, eps)`` pair."""
    ab = self.ab(t).reshape(-1, *([1] * (x_t.ndim - 1)))
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    if self.prediction == "epsilon":
      eps = model_out
      return (x_t - s * eps) / a, eps
    x0 = a * x_t - s * model_out
    return x0, s * x_t + a * model_out


def diffusion_loss(schedule: Schedule, apply_fn: Callable, x0, rng, *,
                   min_snr_gamma: float | None = None, t=None):
  """Mean-squared error of the prediction at a random timestep (per-example weighted mean).

  ``apply_fn(x_t, t) -> prediction``. ``min_snr_gamma`` enables min-SNR-gamma weighting
  (Hang et al.), expressed for the configured prediction type. Returns ``(loss, per_example)``.
  """
  rng_t, rng_n = jax.random.split(rng)
  b = x0.shape[0]
  if t is None:
    t = jax.random.randint(rng_t, (b,), 0, schedule.num_timesteps)
  noise = jax.random.normal(rng_n, x0.shape, jnp.float32)
  x_t = schedule.add_noise(x0, noise, t)
  pred = apply_fn(x_t, t)
  per_example = jnp.mean(jnp.square(pred - schedule.target(x0, noise, t)),
                         axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma is not None:
    ab = schedule.ab(t)
    snr = ab / (1 - ab)
    clipped = jnp.minimum(snr, min_snr_gamma)
    weight = clipped / snr if schedule.prediction == "epsilon" else clipped / (snr + 1)
    per_example = per_example * weight
  return jnp.mean(per_example), per_example


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> np.ndarray:
  """Descending DDIM timesteps, exactly ``steps`` distinct ones. ``leading`` as Stable Diffusion
  (offset 1), ``trailing`` ends at T-1 (use it with zero-terminal-SNR schedules): ``T (steps - i)
  / steps`` rounded half up, minus 1, in integer arithmetic (diffusers' float ``arange`` gives
  ``steps + 1`` entries for some step counts)."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"sampling steps={steps}: expected 1..{num_timesteps}")
  if spacing == "leading":
    ratio = num_timesteps // steps
    offset = 1 if (steps - 1) * ratio + 1 < num_timesteps else 0  # steps = T: no room for it
    ts = np.arange(steps) * ratio + offset
  elif spacing == "trailing":
    k = np.arange(1, steps + 1, dtype=np.int64)
    ts = (2 * num_timesteps * k + steps) // (2 * steps) - 1
  else:
    raise ValueError(f"timestep spacing {spacing!r}: expected leading or trailing")
  return np.minimum(ts, num_timesteps - 1)[::-1].astype(np.int32)


def check_strength(strength: float) -> float:
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"sampling strength={strength}: expected a value in (0, 1]")
  return float(strength)


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "leading",
                       strength: float = 1.0) -> np.ndarray:
  """The descending timesteps a sampler visits (int32).

  ``strength = 1``: the DDIM grid :func:`ddim_timesteps`, started from pure noise.
  ``strength < 1``: the start is a sample at ``t0 = round(strength * T)`` (clamped to
  ``[1, T - 1]``; the upsampled LR noised to that level), followed by ``round(strength * steps)``
  (at least 1) evenly spaced steps ``round(t0 (n - i) / n)``, so the step size is the full grid's
  and ``spacing`` does not apply.
  """
  check_strength(strength)
  if strength >= 1.0:
    return ddim_timesteps(num_timesteps, steps, spacing)
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"sampling steps={steps}: expected 1..{num_timesteps}")
  t0 = int(min(num_timesteps - 1, max(1, round(strength * num_timesteps))))
  n = int(min(t0, max(1, round(strength * steps))))
  i = np.arange(n, dtype=np.int64)
  return ((2 * t0 * (n - i) + n) // (2 * n)).astype(np.int32)


def ddim_sample(schedule: Schedule, denoise: Callable, x_T, rng, *, steps: int,
                eta: float | jax.Array = 0.0, scale: float | jax.Array = 0.0,
                guided: bool = True, spacing: str = "leading", clip_x0: float | None = None,
                strength: float = 1.0):
  """DDIM from ``x_T``; the whole loop is one ``lax.fori_loop`` (call it inside ``jax.jit``).

  Args:
    denoise: ``denoise(x, t) -> model output``. With ``guided=True`` it receives the positive and
      negative branches stacked along the batch (``[2B, ...]``, positive first) in one call,
      and the two halves are combined with :func:`guidance.combine`.
    x_T: initial noise ``[B, ...]``.
    eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
    scale: the guidance scale ``w``; traced, so changing it does not recompile.
    clip_x0: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]`` (pixel-space models).
    strength: < 1 visits :func:`sampling_timesteps` instead of the whole grid; ``x_T`` must then
      be a sample at its first timestep ``round(strength * T)``.
  """
  ts_np = sampling_timesteps(schedule.num_timesteps, steps, spacing, strength)
  ts = jnp.asarray(ts_np)
  ts_prev = jnp.asarray(np.append(ts_np[1:], -1).astype(np.int32))  # -1: alpha_bar = 1 (x_0)
  ab_all = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  b = x_T.shape[0]

  def body(i, x):
    t = ts[i]
    t_prev = ts_prev[i]
    ab_t = ab_all[t]
    ab_prev = jnp.where(t_prev >= 0, ab_all[jnp.maximum(t_prev, 0)], 1.0)
    tb = jnp.full((b,), t, jnp.int32)
    if guided:
      out = denoise(jnp.concatenate([x, x]), jnp.concatenate([tb, tb]))
      out = guidance.combine(out[:b], out[b:], scale)
    else:
      out = denoise(x, tb)
    x0, eps = schedule.to_x0_eps(out, x, tb)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1 - ab_t)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab_t)) * jnp.sqrt(1 - ab_t / ab_prev)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    dir_xt = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
    return jnp.sqrt(ab_prev) * x0 + dir_xt + sigma * noise

  return jax.lax.fori_loop(0, len(ts_np), body, x_T)
