"""The context path carries information: a synthetic SR task whose HR target is recoverable only
from the caption and the modality maps, trained briefly through the real update step.

Each example hides one random sign per context group (text, depth, seg, edge). The LR input is
flat grey, so it says nothing; the HR is the LR plus four fixed patterns, each multiplied by its
group's sign, and only that group shows the sign: the caption reads "plus" or "minus", the depth
map is dark or bright, the segmentation map holds one label or another, the edge map has
vertical or horizontal lines. With v prediction on a zero-terminal-SNR schedule, the noisy input
at t = T - 1 is pure noise, so there the implied x0 can only come from the conditions: with a
group nulled its pattern is a coin flip (error = the pattern's variance), with the group it is
known. The held-out x0 error with every group must fall below half the error with the context
nulled, and nulling each group on its own must raise the error by more than half of what that
group's pattern carries; a group cut off from the DiT (no path from its tokens) fails its test.
Measured figures, and the runs with a group cut off, are in docs/model.md.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmsr_jax.data.captions import ByteTokenizer
from mmsr_jax.data.modalities import render_map
from mmsr_jax.formats.records import CONTEXT_GROUPS, MODALITIES
from mmsr_jax.runtime import sharding
from mmsr_jax.training import sr_report, sr_task
from tests.conftest import small_config

HR, SCALE, MAP = 16, 4, 16
AMP = 0.2  # pattern amplitude in [-1, 1] image units (x4 in the residual the model diffuses)
STEPS = 300
CAPTIONS = ("minus", "plus")


def _patterns() -> dict[str, np.ndarray]:
  """One fixed HR pattern per group, entries +-1 on a subset of the channels."""
  yy, xx = np.mgrid[0:HR, 0:HR]
  ones = np.ones((HR, HR, 1), np.float32)
  return {
      "text": ones * np.array([1.0, -1.0, 0.0], np.float32),  # a colour cast
      "depth": ones * np.array([1.0, 1.0, 1.0], np.float32),  # brightness
      "seg": np.where(yy % 4 < 2, 1.0, -1.0)[..., None] * np.array([0.0, 1.0, -1.0]),
      "edge": np.where(xx % 8 < 4, 1.0, -1.0)[..., None] * np.array([1.0, 0.0, 1.0]),
  }


PATTERNS = _patterns()


def random_signs(rng: np.random.Generator) -> dict[str, int]:
  return {g: int(rng.integers(0, 2)) for g in CONTEXT_GROUPS}  # 0 -> -1, 1 -> +1


def example(signs: dict[str, int], tokenizer) -> dict[str, np.ndarray]:
  """One training / held-out example in the training loader's format."""
  hr = sum(AMP * (2 * signs[g] - 1) * PATTERNS[g] for g in CONTEXT_GROUPS)
  m = np.arange(MAP)
  lines = (m % 4 == 0).astype(np.float32)
  raw = {"depth": np.full((MAP, MAP), 0.2 + 0.6 * signs["depth"], np.float32),
         "seg": np.full((MAP, MAP), 5 + 60 * signs["seg"], np.int32),
         "edge": np.tile(lines, (MAP, 1)) if signs["edge"] else np.tile(lines[:, None], (1, MAP))}
  ids, mask = tokenizer.encode(CAPTIONS[signs["text"]], 16)
  return {"hr": hr.astype(np.float32),
          "lr": np.zeros((HR // SCALE, HR // SCALE, 3), np.float32),
          **{k: render_map(k, raw[k], MAP) for k in MODALITIES},
          "present": np.ones(len(MODALITIES), np.bool_),
          "text_ids": ids.astype(np.int32), "text_mask": mask.astype(np.int32)}


def pattern_variance(group: str, residual_scale: float) -> float:
  """The x0 error a model that ignores ``group`` cannot avoid (the target is a mean over pixels)."""
  return float(np.mean(np.square(residual_scale * AMP * PATTERNS[group])))


def task_config():
  c = small_config(**{
      "batch_size": 16, "num_train_steps": STEPS, "data.hr_size": HR, "data.eval_size": HR,
      "data.map_size": MAP, "data.maps_from": "record", "optimizer.lr": 1e-3,
      "optimizer.warmup_steps": 20, "optimizer.ema_decay": 0.0,
      "diffusion.prediction": "v", "diffusion.rescale_zero_snr": True,
      "sampling.spacing": "trailing",
      "eval.val_batches": 2})
  return c


@pytest.fixture(scope="module")
def held_out_errors(tmp_path_factory):
  """Trains on the synthetic task; the held-out x0 error at t = T - 1 per condition setting."""
  config = task_config()
  tok = ByteTokenizer()
  trainer = sr_task.SRTask(config, str(tmp_path_factory.mktemp("context")),
                           devices=jax.devices()[:1])
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    examples = [example(random_signs(rng), tok) for _ in range(config.batch_size)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    state, metrics = trainer.step(state, sharding.global_batch(batch, trainer.mesh))
  assert np.isfinite(float(metrics["loss"]))
  held = [example(random_signs(np.random.default_rng(100_000 + i)), tok) for i in range(32)]
  t_max = trainer.system.schedule.num_timesteps - 1
  errors = sr_report.val_losses(config, trainer, state.params, held, t=t_max, x0_error=True)
  return errors, config.diffusion.residual_scale


def test_synthetic_groups_show_their_sign_in_the_token_ids():
  """Precondition: the frozen tokenizer gives different ids for the two signs of each map."""
  config = task_config()
  from mmsr_jax.system import System
  system = System.from_config(config, jax.devices()[:1])
  frozen = system.load_frozen()
  tok = ByteTokenizer()
  signs = [{g: k for g in CONTEXT_GROUPS} for k in (0, 1)]
  exs = [example(s, tok) for s in signs]
  maps = np.stack([np.stack([e[m] for m in MODALITIES]) for e in exs])
  ids = np.asarray(system.conditioner.modality_ids(frozen, maps))
  for i, m in enumerate(MODALITIES):
    by_sign = {}
    for s, row in zip(signs, ids[:, i]):
      by_sign.setdefault(s[m], set()).add(row.tobytes())
    assert len(by_sign) == 2 and not set.intersection(*by_sign.values()), m


def test_context_lowers_the_error_below_half(held_out_errors):
  errors, _ = held_out_errors
  assert errors["all"] < 0.5 * errors["no_context"], errors


@pytest.mark.parametrize("group", CONTEXT_GROUPS)
def test_each_group_carries_its_pattern(held_out_errors, group):
  """Nulling one group at least doubles the error and raises it by more than half of its
  pattern's variance."""
  errors, residual_scale = held_out_errors
  assert errors["all"] < 0.5 * errors[f"no_{group}"], (group, errors)
  gain = errors[f"no_{group}"] - errors["all"]
  assert gain > 0.5 * pattern_variance(group, residual_scale), (group, errors)
