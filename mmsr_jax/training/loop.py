"""The training loop every task shares: resume or initialise, jitted steps on global batches,
metrics and non-finite checks, checkpoints, preemption, and the task's report at the end.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Protocol

import jax
import numpy as np

from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.training import flops as flops_lib
from mmsr_jax.runtime import sharding
from mmsr_jax.runtime import workdir as workdir_lib


class Task(Protocol):
  """What a task builds once and the loop uses; optionally also ``flops_per_step()`` (MFU) and
  ``sample_grid(state) -> {name: uint8 image}`` (logged every ``config.sample_every`` steps)."""

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


# What a run writes inside its workdir (folders made when first needed, files appended or
# replaced): each one that exists already is checked before the task is built.
RUN_FOLDERS = ("checkpoints", ckpt_lib.SET_ASIDE_DIR, "tensorboard", "progress", "profile",
               "samples")
RUN_FILES = ("metrics.jsonl", "config.json", "report.json")


def check_writable(workdir: str) -> None:
  """OSError naming ``--workdir`` and the folder or file, now rather than at the first save,
  when anything the run will write cannot be written (a read-only or full disk)."""
  workdir_lib.check_writable(workdir, "--workdir")
  for name in RUN_FOLDERS:
    if os.path.isdir(os.path.join(workdir, name)):
      workdir_lib.check_writable(os.path.join(workdir, name), "--workdir", workdir)
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      try:
        with open(path, "a"):  # appends nothing; fails where a write would
          pass
      except OSError as e:
        raise OSError(f"--workdir={workdir}: {path} cannot be written ({e.strerror or e})") from e


def lock_workdir(workdir: str, what: str = "a training run") -> None:
  """Makes this run the only writer of ``workdir`` (:mod:`mmsr_jax.runtime.workdir`) until
  :func:`run` ends or the process exits; another process's run is refused with one line naming
  it. With several processes, process 0 holds the lock for all of them (they share the run's
  files, each writing its share) and every process gets the same answer."""
  reason = None
  if ckpt_lib.is_primary():
    try:
      workdir_lib.acquire(workdir, what, log=log)
    except OSError as e:
      reason = str(e)
  reason = ckpt_lib.agree(reason)
  if reason is not None:
    raise workdir_lib.WorkdirLocked(reason)


def check_workdir(config, workdir: str) -> None:
  """Before the task is built: the run's files and folders can be written, no other process
  writes the workdir (this process takes its lock), and a run already in it (one that saved a
  checkpoint) has the same architecture and seed. Writes nothing but the folder and the lock."""
  check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock_workdir(workdir)
  try:
    if not os.path.exists(ckpt_lib.config_path(workdir)):
      return
    if not ckpt_lib.saved_steps(workdir):
      # An earlier start that failed before its first checkpoint: its config binds nothing.
      log(f"{ckpt_lib.config_path(workdir)} is from a start that saved no checkpoint; it will "
          "be replaced by this run's config")
      return
    ckpt_lib.check_compatible(ckpt_lib.load_config(workdir), config, f"--workdir={workdir}")
  except BaseException:
    workdir_lib.release(workdir)
    raise


def first_non_finite(host_metrics: list[dict], first_step: int) -> int | None:
  """The step number of the first entry whose loss or gradient norm is not finite."""
  for i, m in enumerate(host_metrics):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      return first_step + i
  return None


# --- Preemption ---------------------------------------------------------------------------------
class Preemption:
  """Tells the loop when to save and stop because the machine is going away.

  With one process, SIGTERM sets a flag (the previous handler is restored on ``close``). With
  several, ``jax.experimental.multihost_utils.reached_preemption_sync_point`` answers (the JAX
  distributed runtime catches SIGTERM itself and agrees a common step with every process); if
  that service is not running, a Python flag is shared by an all-gather every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync_point = jax.process_count() > 1
    if self._sync_point:
      try:
        from jax.experimental import multihost_utils
        multihost_utils.reached_preemption_sync_point(0)
      except Exception:  # noqa: BLE001 - no preemption service: fall back to the flag
        self._sync_point = False
    if not self._sync_point and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    self.requested = True
    log(f"signal {signum} received: finishing the current step, then saving and stopping")

  def __call__(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (the same answer on every process)."""
    if self._sync_point:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        log(f"preemption sync point of the JAX distributed runtime reached at step {step}")
        return True
      return False
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
      if np.any(flags):
        log(f"SIGTERM seen by process(es) {np.flatnonzero(flags).tolist()} (all-gathered flag)")
        return True
      return False
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# --- Observability ------------------------------------------------------------------------------
METRICS_FILE = "metrics.jsonl"


def drop_metrics_after(workdir: str, step: int) -> None:
  """Removes the records past ``step`` from ``workdir/metrics.jsonl`` (a resume from ``step``
  logs those steps again; kept, each would appear twice). Rewritten whole, then renamed."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      record_step = None  # a line cut short by a kill: dropped with the steps after it
    if record_step is None or record_step > step:
      break
    keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
  log(f"{path}: dropped {len(lines) - len(keep)} record(s) past step {step}, the step this run "
      "continues from")


def read_metrics(workdir: str) -> list[dict]:
  """The records :class:`Writer` logged to ``workdir/metrics.jsonl`` (empty when there are none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Writer:
  """metrics.jsonl and TensorBoard (tensorboardX) on the primary process; no-ops elsewhere."""

  def __init__(self, workdir: str, config):
    self.workdir = workdir
    self.primary = ckpt_lib.is_primary()
    self.tb = None
    if self.primary and config.get("tensorboard", False):
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, record: dict) -> None:
    if not self.primary:
      return
    with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and v is not None:
          self.tb.add_scalar(f"train/{k}", v, step)
      self.tb.flush()

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    if not self.primary:
      return
    from PIL import Image
    folder = os.path.join(self.workdir, "progress")
    os.makedirs(folder, exist_ok=True)
    for name, img in images.items():
      Image.fromarray(np.asarray(img)).save(os.path.join(folder, f"{step:08d}_{name}.png"))
      if self.tb is not None:
        self.tb.add_image(f"samples/{name}", np.asarray(img), step, dataformats="HWC")
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class ProfileWindow:
  """A ``jax.profiler`` trace of steps ``[start, start + num_steps)`` (every process)."""

  def __init__(self, workdir: str, config):
    prof = config.get("profile", None)
    self.start = int(prof.start_step) if prof is not None else 0
    self.stop = self.start + (int(prof.num_steps) if prof is not None else 0)
    self.dir = os.path.join(workdir, "profile", f"process_{jax.process_index()}")
    self.active = False

  def before(self, step: int) -> None:
    if self.stop > self.start and step == self.start:
      os.makedirs(self.dir, exist_ok=True)
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.stop - 1:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log(f"profiler trace of steps {self.start}..{self.stop - 1} written to {self.dir}")


def mfu(task, steps_per_s: float) -> float | None:
  """Model FLOPs utilisation of the window, if the task counts FLOPs and the device is known."""
  fn = getattr(task, "flops_per_step", None)
  peak = (float(task.config.get("peak_flops", 0.0) or 0.0)
          or flops_lib.peak_flops_per_device(task.mesh.devices.flat[0]))
  if fn is None or peak is None:
    return None
  return fn() * steps_per_s / (peak * task.mesh.devices.size)


# --- The loop -----------------------------------------------------------------------------------
def resume(ckpt: ckpt_lib.Checkpointer, task: Task, data_iter,
           restore_step: int | None = None) -> tuple[Any, int] | None:
  """Restores the newest good checkpoint (or ``restore_step``) into ``data_iter`` and returns
  ``(state, step)``; None when there is none.

  A corrupt newest step (files changed since they were written, NaN / infinite arrays) is logged
  and the next older one is tried; once one restores, the corrupt ones are moved to
  ``WORKDIR/checkpoints_set_aside`` (so new saves can take their step numbers). With
  ``restore_step`` the steps after it are moved there too, and a corrupt ``restore_step`` is an
  error. Checkpoints that do not fit the model, or that are all corrupt, are an error and are
  left where they are.
  """
  steps = ckpt.all_steps()
  if restore_step is not None:
    if restore_step not in steps:
      raise ValueError(f"--restore_step={restore_step}: no such checkpoint in {ckpt.directory} "
                       f"(steps: {', '.join(map(str, steps)) or 'none'})")
    log(f"resuming from {ckpt.step_dir(restore_step)} (--restore_step)")
    warning = ckpt.unchecked_warning(restore_step)
    if warning is not None:
      log(warning)
    state = ckpt.restore(restore_step, task.abstract_with_shardings(), data_iter)
    for s in steps:
      if s > restore_step:
        where = ckpt.set_aside(s, f"newer than --restore_step={restore_step}")
        log(f"moved checkpoint {s} to {where} (newer than --restore_step={restore_step})")
    return state, restore_step
  corrupt = []
  for step in reversed(steps):
    log(f"resuming from {ckpt.step_dir(step)}")
    warning = ckpt.unchecked_warning(step)
    if warning is not None:
      log(warning)
    try:
      state = ckpt.restore(step, task.abstract_with_shardings(), data_iter)
    except ckpt_lib.CorruptCheckpoint as e:
      log(f"{e}; trying the previous checkpoint")
      corrupt.append(e)
      continue
    for e in corrupt:
      where = ckpt.set_aside(e.step, str(e))
      log(f"moved the corrupt checkpoint {e.step} to {where}")
    if corrupt:
      log(f"resumed from step {step}, the newest good checkpoint")
    return state, step
  if corrupt:
    raise ckpt_lib.CheckpointError(
        f"every checkpoint in {ckpt.directory} is corrupt ("
        + "; ".join(f"{e.step}: {e.reason}" for e in corrupt)
        + "); move that folder away to start fresh")
  return None


def run(task: Task, workdir: str, *, stop_at: int | None = None, write_report: bool = True,
        restore_step: int | None = None) -> Any:
  """Trains ``task`` to ``config.num_train_steps`` (or stops after ``stop_at``, saving),
  resuming from the newest good checkpoint (or ``restore_step``, see :func:`resume`).

  Returns the final state; on preemption, the state of the step it saved and stopped at.
  The process holds the workdir's lock (:func:`lock_workdir`) until it returns.
  """
  lock_workdir(workdir)  # held already when check_workdir ran
  try:
    return _run(task, workdir, stop_at=stop_at, write_report=write_report,
                restore_step=restore_step)
  finally:
    workdir_lib.release(workdir)


def window_record(task: Task, host: list[dict], step: int, seconds: float,
                  data_wait: float) -> dict[str, float]:
  """What is logged for a window of steps ending at ``step`` (``host``: each step's metrics,
  fetched): losses and the gradient norm averaged over it, other scalars at its last step, and
  its speed (steps and images per second, MFU where known, the wait for data per step)."""
  n = len(host)
  sps = n / max(seconds, 1e-9)
  record = {"step": step}
  for k in host[-1]:
    vals = [float(m[k]) for m in host]
    record[k] = float(np.mean(vals)) if "loss" in k or k == "grad_norm" else vals[-1]
  record.update(steps_per_s=sps, images_per_s=sps * task.config.batch_size,
                data_wait_s=data_wait / n, window=n)
  util = mfu(task, sps)
  if util is not None:
    record["mfu"] = util
  return record


def _run(task: Task, workdir: str, *, stop_at: int | None, write_report: bool,
         restore_step: int | None) -> Any:
  config = task.config

  # --- Input.
  data_iter = iter(task.make_loader())

  # --- Checkpoint / resume.
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, log=log)
  try:
    resumed = resume(ckpt, task, data_iter, restore_step)
  except BaseException:
    ckpt.close()
    raise
  if resumed is not None:
    state, start = resumed
  else:
    start = 0
    state = task.init_state()
  if ckpt_lib.is_primary():
    drop_metrics_after(workdir, start)
  # The run has started: only now does its config replace the folder's (a rejected resume or a
  # failed start leaves the previous one as it was).
  if ckpt_lib.is_primary():
    ckpt_lib.save_config(workdir, config)

  writer = Writer(workdir, config)
  profile = ProfileWindow(workdir, config)
  preemption = Preemption()
  sample_every = int(config.get("sample_every", 0) or 0)
  total = config.num_train_steps
  end = total if stop_at is None else min(stop_at, total)
  preempted = False
  pending, t_window, steps_in_window, window_start, data_wait = [], time.time(), 0, start + 1, 0.0
  try:
    for step in range(start + 1, end + 1):
      t0 = time.perf_counter()
      batch = sharding.global_batch(next(data_iter), task.mesh)
      data_wait += time.perf_counter() - t0
      profile.before(step)
      state, metrics = task.step(state, batch)
      profile.after(step, state)
      pending.append(metrics)
      steps_in_window += 1
      preempted = preemption(step)
      save_now = step % config.checkpoint_every == 0 or step == end or preempted
      # Metrics are fetched (and checked for non-finite values) at every logging step and before
      # every save, so a checkpoint never holds a state past a non-finite step.
      if step % config.log_every == 0 or save_now:
        host = jax.device_get(pending)
        bad = first_non_finite(host, window_start)
        if bad is not None:
          raise FloatingPointError(
              f"non-finite loss or gradient norm at step {bad}; the last good checkpoint "
              f"({ckpt.latest_step()}) in {ckpt.directory} is kept")
        record = window_record(task, host, step, time.time() - t_window, data_wait)
        sps = record["steps_per_s"]
        lr = f"  lr {record['lr']:.2e}" if "lr" in record else ""
        log(f"step {step}/{total}  loss {record['loss']:.4f}  grad_norm "
            f"{record['grad_norm']:.3f}{lr}  {sps:.2f} steps/s  ETA "
            f"{(total - step) / max(sps, 1e-9):.0f}s")
        writer.scalars(step, record)
        pending, t_window, steps_in_window, window_start = [], time.time(), 0, step + 1
        data_wait = 0.0
      if sample_every and step % sample_every == 0 and hasattr(task, "sample_grid"):
        writer.images(step, task.sample_grid(state))
      if save_now:
        bad = ckpt_lib.non_finite_leaf(state)  # loss and gradient norm can look fine meanwhile
        if bad is not None:
          raise FloatingPointError(
              f"{bad} of the state holds NaN or infinite values at step {step}; not saved: the "
              f"last good checkpoint ({ckpt.latest_step()}) in {ckpt.directory} is kept")
        ckpt.save(step, state, data_iter, force=True)
      if preempted:
        ckpt.wait()
        log(f"preempted: saved step {step} to {ckpt.directory}; stopping (rerun the same "
            "command to continue)")
        break
  finally:
    profile.close()
    preemption.close()
    ckpt.wait()  # a failing run still finishes writing its last good checkpoint
    ckpt.close()
    writer.close()

  if write_report and not preempted and end == total and ckpt_lib.is_primary():
    report = task.write_report(workdir, state)
    log("report: " + json.dumps({k: v for k, v in report.items() if k != "per_image"}))
  return state
