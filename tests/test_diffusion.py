"""Noise schedules, prediction types, DDIM on a Gaussian toy, and the three guidance modes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmsr_jax.diffusion import schedule as diffusion, sampler
from mmsr_jax.data.captions import ByteTokenizer
from mmsr_jax.models import build
from mmsr_jax.system import dummy_inputs, frozen_params
from mmsr_jax.models.mmsr import MMSR


def _sched_cfg(**kw):
  c = dict(num_timesteps=1000, schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
           prediction="epsilon", rescale_zero_snr=False)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_schedules_match_their_definitions():
  b = diffusion.make_betas("scaled_linear", 1000, 0.00085, 0.012)
  assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
  assert b[500] == pytest.approx((0.00085 ** 0.5 + 500 / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2)
  lin = diffusion.make_betas("linear", 1000, 1e-4, 0.02)
  assert lin[1] - lin[0] == pytest.approx((0.02 - 1e-4) / 999)
  cos = diffusion.make_betas("cosine", 1000)
  ab = np.cumprod(1 - cos)
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
  np.testing.assert_allclose(ab[:900], (f(np.arange(1, 1001)) / f(0))[:900], rtol=1e-6)
  zs = diffusion.Schedule.from_config(_sched_cfg(rescale_zero_snr=True, prediction="v"))
  assert zs.alphas_cumprod[-1] == 0.0
  assert zs.alphas_cumprod[0] == pytest.approx(1 - 0.00085)
  with pytest.raises(ValueError, match="config.diffusion.schedule"):
    diffusion.make_betas("sigmoid", 10)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_prediction_targets_invert(prediction):
  s = diffusion.Schedule.from_config(_sched_cfg(prediction=prediction))
  k = jax.random.split(jax.random.key(0), 2)
  x0, eps = jax.random.normal(k[0], (4, 3)), jax.random.normal(k[1], (4, 3))
  t = jnp.array([0, 10, 500, 999])
  x_t = s.add_noise(x0, eps, t)
  x0_hat, eps_hat = s.to_x0_eps(s.target(x0, eps, t), x_t, t)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if prediction == "epsilon" else 1e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)


def test_ddim_timesteps():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 4), [751, 501, 251, 1])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
  for spacing in diffusion.SPACINGS:  # diffusers' float arange gave steps + 1 for 62 counts
    for steps in range(1, 1001):
      ts = diffusion.ddim_timesteps(1000, steps, spacing)
      assert len(ts) == steps and np.all(np.diff(ts) < 0) and ts[-1] >= 0, (spacing, steps)
      if spacing == "trailing":
        assert ts[0] == 999
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 61, "trailing")[-3:], [48, 32, 15])


def test_strength_starts_at_strength_times_T():
  """strength < 1: start at t = round(strength * T), round(strength * steps) even steps."""
  st = diffusion.sampling_timesteps
  np.testing.assert_array_equal(st(1000, 10, "leading", 0.2), [200, 100])
  np.testing.assert_array_equal(st(1000, 10, "trailing", 0.2), [200, 100])
  np.testing.assert_array_equal(st(1000, 20, "leading", 0.25), [250, 200, 150, 100, 50])
  np.testing.assert_array_equal(st(1000, 10, "leading", 1.0), diffusion.ddim_timesteps(1000, 10))
  np.testing.assert_array_equal(st(1000, 1, "leading", 0.3), [300])  # was: pure noise at t = 1
  np.testing.assert_array_equal(st(1000, 50, "leading", 1e-4), [1])
  np.testing.assert_array_equal(st(1000, 50, "leading", 0.9999), st(1000, 50, "leading", 0.9999))
  assert st(1000, 50, "leading", 0.9999)[0] == 999 and len(st(1000, 50, "leading", 0.9999)) == 50
  for bad in (0.0, 1.5, -1.0):
    with pytest.raises(ValueError, match="strength"):
      st(1000, 10, "leading", bad)


@pytest.mark.parametrize("strength", [1.0, 0.35])
def test_ddim_visits_the_sampling_timesteps(strength):
  """The jitted loop equals DDIM written out by hand over sampling_timesteps."""
  sched = diffusion.Schedule.from_config(_sched_cfg(prediction="v"))
  denoise = lambda x, t: 0.3 * x + 0.01 * t[:, None].astype(jnp.float32) / 1000  # noqa: E731
  x_T = jax.random.normal(jax.random.key(0), (5, 2))
  out = diffusion.ddim_sample(sched, denoise, x_T, jax.random.key(1), steps=6, guided=False,
                              strength=strength)
  ts = list(diffusion.sampling_timesteps(1000, 6, "leading", strength)) + [-1]
  assert len(ts) - 1 == (6 if strength == 1.0 else 2) and ts[0] == (831 if strength == 1.0 else 350)
  x = np.asarray(x_T)
  ab = np.append(np.asarray(sched.alphas_cumprod), 1.0)  # ab[-1]: t = -1 is x_0
  for t, t_prev in zip(ts[:-1], ts[1:]):
    tb = jnp.full((x.shape[0],), t)
    x0, eps = sched.to_x0_eps(denoise(x, tb), x, tb)
    x = np.sqrt(ab[t_prev]) * x0 + np.sqrt(1 - ab[t_prev]) * eps
  np.testing.assert_allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_gaussian_toy_reaches_the_data_distribution(eta, prediction):
  """x0 ~ N(mu, s^2): the optimal predictor is known in closed form; DDIM must recover mu, s."""
  mu, s = 1.5, 0.5
  sched = diffusion.Schedule.from_config(_sched_cfg(prediction=prediction))
  ab_all = jnp.asarray(sched.alphas_cumprod, jnp.float32)

  def optimal(x_t, t):
    ab = ab_all[t].reshape(-1, 1)
    var = ab * s ** 2 + 1 - ab
    eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / var
    x0 = (x_t - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    return eps if prediction == "epsilon" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

  n = 20000
  # Start from the exact marginal at the first DDIM timestep (pure N(0, 1) would carry the
  # schedule's non-zero terminal SNR into the result; that case is tested with zero-SNR below).
  # 250 steps: DDIM's discretisation shrinks the variance with few steps (0.40 at 10 steps,
  # 0.47 at 50, 0.49 at 200 for s = 0.5), converging to s as steps grow.
  steps = 250
  ab0 = float(ab_all[diffusion.ddim_timesteps(1000, steps)[0]])
  x_T = (np.sqrt(ab0) * mu + np.sqrt(ab0 * s ** 2 + 1 - ab0)
         * jax.random.normal(jax.random.key(1), (n, 1)))
  out = jax.jit(lambda x, r: diffusion.ddim_sample(sched, optimal, x, r, steps=steps, eta=eta,
                                                   guided=False))(x_T, jax.random.key(2))
  out = np.asarray(out)
  assert abs(out.mean() - mu) < 0.02
  assert abs(out.std() - s) < 0.02


def test_ddim_zero_terminal_snr_from_pure_noise():
  mu, s = -0.7, 0.3
  sched = diffusion.Schedule.from_config(_sched_cfg(prediction="v", rescale_zero_snr=True))
  ab_all = jnp.asarray(sched.alphas_cumprod, jnp.float32)

  def optimal_v(x_t, t):
    ab = ab_all[t].reshape(-1, 1)
    x0 = mu + jnp.sqrt(ab) * s ** 2 * (x_t - jnp.sqrt(ab) * mu) / (ab * s ** 2 + 1 - ab)
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

  x_T = jax.random.normal(jax.random.key(1), (20000, 1))
  out = np.asarray(diffusion.ddim_sample(sched, optimal_v, x_T, jax.random.key(2), steps=250,
                                         guided=False, spacing="trailing"))
  assert abs(out.mean() - mu) < 0.02 and abs(out.std() - s) < 0.02


def test_loss_is_zero_for_the_true_target_and_min_snr_weights():
  sched = diffusion.Schedule.from_config(_sched_cfg(prediction="v"))
  x0 = jnp.ones((3, 2, 2, 1))
  # A model that returns exactly the target has zero loss (target depends on the noise drawn).
  t = jnp.array([5, 300, 900])
  rng = jax.random.key(0)
  noise = jax.random.normal(jax.random.split(rng)[1], x0.shape)
  loss, _ = diffusion.diffusion_loss(sched, lambda z, tt: sched.target(x0, noise, tt), x0, rng, t=t)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)
  loss_w, per = diffusion.diffusion_loss(sched, lambda z, tt: jnp.zeros_like(z), x0, rng, t=t,
                                         min_snr_gamma=5.0)
  _, per_plain = diffusion.diffusion_loss(sched, lambda z, tt: jnp.zeros_like(z), x0, rng, t=t)
  ab = np.asarray(sched.ab(t))
  snr = ab / (1 - ab)
  np.testing.assert_allclose(per, per_plain * np.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)


@pytest.mark.parametrize("mode", ["cfg", "m0cfg", "mcfg"])
def test_guidance_modes_match_their_formulas(config, mode):
  """One DDIM step (eta=0, prev alpha_bar=1) returns decode(x0) of the guided prediction; build
  the negative branch by hand for each mode and compare."""
  config.diffusion.prediction = "epsilon"
  config.sampling.clip_x0 = 0.0
  model, cond = build.mmsr(config), build.conditioner(config)
  sched = diffusion.Schedule.from_config(config.diffusion)
  tok = ByteTokenizer()
  params = jax.jit(model.init)(jax.random.key(0), *dummy_inputs(config, cond))["params"]
  # Give the zero-initialised output layer weights, so predictions depend on the conditions.
  params = jax.tree.map(lambda x: x, params)
  proj = params["dit"]["proj_out"]["kernel"]
  params["dit"]["proj_out"]["kernel"] = proj.replace_boxed(
      jax.random.normal(jax.random.key(3), proj.value.shape) * 0.2)
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  frozen = frozen_params(config, cond)
  rng = np.random.default_rng(0)
  m, lr_size, L = config.data.map_size, config.data.hr_size // 4, config.text.max_length
  ex = []
  for i in range(2):
    ids, mask = tok.encode(["a cat", "red wall"][i], L)
    ex.append({"lr": rng.uniform(-1, 1, (lr_size, lr_size, 3)).astype(np.float32),
               "text_ids": ids, "text_mask": mask,
               "depth": rng.uniform(-1, 1, (m, m, 3)).astype(np.float32),
               "seg": np.zeros((m, m, 3), np.float32),
               "edge": rng.uniform(-1, 1, (m, m, 3)).astype(np.float32),
               "present": np.array([True, False, True])})
  inputs = sampler.make_inputs(ex, tok, config, negative_prompt="blurry")
  w = 3.0
  grid = sampler.make_grid(config, (lr_size, lr_size))
  assert grid.num_tiles == 1
  fn = sampler.make_sample_fn(model, cond, sched, grid, steps=1, guidance=mode)
  got = fn(params, frozen, inputs, jax.random.key(7), w, 0.0)

  # By hand.
  b = 2
  lr_lat = cond.lr_latent(frozen, jnp.asarray(inputs["lr"]), (config.data.hr_size,) * 2)
  ids = cond.modality_ids(frozen, jnp.asarray(inputs["maps"]))
  def eps_for(text_ids, text_mask, present, z, t):
    states = cond.text_states(frozen, text_ids, text_mask)
    ctx = model.apply({"params": params}, states, text_mask, ids, present,
                      inputs["temperature"], method=MMSR.encode_context)
    return model.apply({"params": params}, z, t, lr_lat, ctx, method=MMSR.denoise)
  r_init, _ = jax.random.split(jax.random.key(7))
  lat = config.data.hr_size // 4
  z = jax.random.normal(r_init, (b, lat, lat, 48))
  t = jnp.full((b,), diffusion.ddim_timesteps(1000, 1)[0])
  present = inputs["present"]
  neg = {"cfg": (inputs["null_ids"], inputs["null_mask"], np.zeros_like(present)),
         "m0cfg": (inputs["neg_ids"], inputs["neg_mask"], np.zeros_like(present)),
         "mcfg": (inputs["neg_ids"], inputs["neg_mask"], present)}[mode]
  e_pos = eps_for(inputs["text_ids"], inputs["text_mask"], present, z, t)
  e_neg = eps_for(*neg, z, t)
  eps = (1 + w) * e_pos - w * e_neg
  ab = sched.ab(t)[:, None, None, None]
  x0 = (z - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
  want = jnp.clip(cond.decode_sample(frozen, x0, lr_lat), -1, 1)
  np.testing.assert_allclose(got, want, atol=2e-4)
  assert float(jnp.abs(e_pos - e_neg).max()) > 1e-3  # the branches really differ
