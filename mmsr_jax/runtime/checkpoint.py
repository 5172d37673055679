"""Orbax checkpoints of the train state with the input iterator's position, and the run's config
file. Restores target the current mesh's shardings; an unreadable checkpoint is an error, never a
fresh start.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mmsr_jax.config import schema



class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, or from another model)."""


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with ``state`` and ``data`` items."""

  def __init__(self, workdir: str, *, keep: int = 3, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores ``state`` (onto the shardings in ``abstract_state``) and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - re-raised with the path; never a silent fresh start
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} could not be restored into the "
          f"current model ({type(e).__name__}: {e}). It is corrupt or from an incompatible "
          "config; move it away to start fresh.") from e
    return restored["state"]

  def restore_part(self, step: int, name: str, abstract_part):
    """Restores only the ``name`` field of the saved state (e.g. ``'ema_params'``) onto the
    shardings of ``abstract_part``; the other arrays (weights, optimizer moments) are never read.

    Sampling needs the EMA weights alone: for an AdamW run they are a quarter of the state, so
    restoring them alone needs a quarter of the host and device memory of :meth:`restore`.
    """
    path = os.path.join(self.directory, str(step), "state")
    target = {name: abstract_part}
    try:
      restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    except Exception as e:  # noqa: BLE001 - re-raised with the path
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))}: its {name!r} could not be "
          f"restored into the current model ({type(e).__name__}: {e}). It is corrupt or from an "
          "incompatible config.") from e
    return restored[name]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(config_path(workdir), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by "
                            "python -m mmsr_jax.train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def _normalise(value):
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     where: str) -> None:
  """Raises if the architecture fields of two configs differ (names the first field)."""
  for field in schema.arch_fields(config):
    a, b = _normalise(_get(saved, field)), _normalise(_get(config, field))
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        k = next(k for k in keys if a.get(k) != b.get(k))
        field, a, b = f"{field}.{k}", a.get(k), b.get(k)
      raise ValueError(f"{where}: config field {field} is {a!r} in the saved run but {b!r} now; "
                       "use a new --workdir or the saved config")


def is_primary() -> bool:
  return jax.process_index() == 0
