"""The one training loop, shared by every trainer of the project (MMSR's DiT, the VQ tokenizers).

A *task* is whatever builds the model-specific pieces once; the loop does everything else the
same way for all of them: checks and saves the resolved config, restores the newest checkpoint
(state and data-iterator position) or initialises, runs the jitted update step on global batches,
logs and checks metrics, saves checkpoints, and asks the task for its held-out report at the end.

A task provides (see ``Task``)::

  config, mesh                    the resolved config and the device mesh
  init_state() -> state           the train state, created already sharded
  abstract_with_shardings()       abstract state carrying the shardings (for restore)
  step(state, batch) -> (state, metrics)   the jitted update; metrics has "loss" and "grad_norm"
  make_loader() -> iterable       per-process batches (a Grain loader: its iterator is checkpointed)
  write_report(workdir, state) -> dict     the held-out report (primary process only)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

import jax
import numpy as np

from mmsr_jax import checkpoint as ckpt_lib
from mmsr_jax import sharding


class Task(Protocol):
  config: Any
  mesh: jax.sharding.Mesh

  def init_state(self) -> Any: ...
  def abstract_with_shardings(self) -> Any: ...
  def step(self, state, batch) -> tuple[Any, dict]: ...
  def make_loader(self): ...
  def write_report(self, workdir: str, state) -> dict: ...


def log(msg: str) -> None:
  """Progress line on stdout (primary process only)."""
  if jax.process_index() == 0:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_workdir(config, workdir: str) -> None:
  """A workdir that already holds a run must hold one with the same architecture."""
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(ckpt_lib.config_path(workdir)):
    ckpt_lib.check_compatible(ckpt_lib.load_config(workdir), config, f"--workdir={workdir}")


def first_non_finite(host_metrics: list[dict], first_step: int) -> int | None:
  """The step number of the first entry whose loss or gradient norm is not finite."""
  for i, m in enumerate(host_metrics):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      return first_step + i
  return None


def run(task: Task, workdir: str, *, stop_at: int | None = None,
        write_report: bool = True) -> Any:
  """Trains ``task`` to ``config.num_train_steps`` (or stops after ``stop_at``, saving)."""
  config = task.config
  if ckpt_lib.is_primary():
    ckpt_lib.save_config(workdir, config)

  # --- Input.
  data_iter = iter(task.make_loader())

  # --- Checkpoint / resume.
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    log(f"resuming from {ckpt.directory}/{start}")
    state = ckpt.restore(start, task.abstract_with_shardings(), data_iter)
  else:
    start = 0
    state = task.init_state()

  # --- Loop.
  total = config.num_train_steps
  end = total if stop_at is None else min(stop_at, total)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  pending, t_window, steps_in_window, window_start = [], time.time(), 0, start + 1
  for step in range(start + 1, end + 1):
    batch = sharding.global_batch(next(data_iter), task.mesh)
    state, metrics = task.step(state, batch)
    pending.append(metrics)
    steps_in_window += 1
    save_now = step % config.checkpoint_every == 0 or step == end
    # Metrics are fetched (and checked for non-finite values) at every logging step and before
    # every save, so a checkpoint never holds a state past a non-finite step.
    if step % config.log_every == 0 or save_now:
      host = jax.device_get(pending)
      bad = first_non_finite(host, window_start)
      if bad is not None:
        raise FloatingPointError(f"non-finite loss or gradient norm at step {bad}; the last good "
                                 f"checkpoint in {ckpt.directory} is kept")
      dt = time.time() - t_window
      sps = steps_in_window / max(dt, 1e-9)
      record = {"step": step}
      for k in host[-1]:  # scalars: mean over the window for losses, last value otherwise
        vals = [float(m[k]) for m in host]
        record[k] = float(np.mean(vals)) if "loss" in k or k == "grad_norm" else vals[-1]
      record.update(steps_per_s=sps, images_per_s=sps * config.batch_size,
                    window=steps_in_window)
      lr = f"  lr {record['lr']:.2e}" if "lr" in record else ""
      log(f"step {step}/{total}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}"
          f"{lr}  {sps:.2f} steps/s  ETA {(total - step) / max(sps, 1e-9):.0f}s")
      if ckpt_lib.is_primary():
        with open(metrics_path, "a") as f:
          f.write(json.dumps(record) + "\n")
      pending, t_window, steps_in_window, window_start = [], time.time(), 0, step + 1
    if save_now:
      ckpt.save(step, state, data_iter, force=True)
  ckpt.wait()
  ckpt.close()

  if write_report and end == total and ckpt_lib.is_primary():
    report = task.write_report(workdir, state)
    log("report: " + json.dumps({k: v for k, v in report.items() if k != "per_image"}))
  return state


