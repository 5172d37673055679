"""The task a config belongs to (``config.task``: ``sr`` or ``vq``), its one validator, and the
fields a resume may not change."""

from __future__ import annotations

import ml_collections

from mmsr_jax.schema import sr, vq

TASKS = {sr.TASK: sr, vq.TASK: vq}
DEFAULTS = {sr.TASK: sr.sr_config, vq.TASK: vq.vq_config}


def task_of(config) -> str:
  task = config.get("task", sr.TASK)  # runs saved before config.task existed are SR runs
  if task not in TASKS:
    raise ValueError(f"config.task={task!r}: expected one of {tuple(TASKS)}")
  return task


def validate(config) -> None:
  """Checks every value and cross-field rule of the config's task (one ValueError naming the
  first bad field)."""
  TASKS[task_of(config)].validate(config)


def arch_fields(config) -> tuple[str, ...]:
  return TASKS[task_of(config)].ARCH_FIELDS


# Beyond the architecture, a resume keeps the run's random stream and input order.
RESUME_FIXED = ("seed",)


def resume_fields(config) -> tuple[str, ...]:
  """The fields whose value a resume may not change."""
  return arch_fields(config) + RESUME_FIXED


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (plain dict) with the fields added to its task's schema since it was
  written taking their defaults, so older runs still sample and resume."""
  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  task = task_of(saved)
  saved = dict(saved)
  if task == sr.TASK and {"text", "modality"} & set(saved.get("cond_dropout", {})):
    # Saved when cond_dropout.text / .modality were the independent rates: the same draws, as
    # the totals they give.
    saved["cond_dropout"] = sr.legacy_drop_totals(saved["cond_dropout"])
  merged = merge(DEFAULTS[task]().to_dict(), saved)
  model = merged.get("model", {})
  if isinstance(model.get("remat"), bool):  # a switch before the remat policies existed
    model["remat"] = "full" if model["remat"] else "none"
  return ml_collections.ConfigDict(merged)
