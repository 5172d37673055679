"""The task a config belongs to (``config.task``: ``sr`` or ``vq``), its one validator, and the
fields a resume may not change."""

from __future__ import annotations

from mmsr_jax.config import sr, vq

TASKS = {sr.TASK: sr, vq.TASK: vq}


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
