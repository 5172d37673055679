"""Orbax checkpoints of the train state with the input iterator's position, a checksum manifest
per step, and the run's config file. Restores target the current mesh's shardings and check
that every file is the one written and every restored array is finite; an unreadable or corrupt
checkpoint is an error naming its step, never a silent fresh start.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import itertools
import json
import os
import re
import shutil
import tempfile
import zlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from mmsr_jax.formats import param_layout as layout
from mmsr_jax.schema import tasks

# Written beside Orbax's item folders once a step is committed: checkpoints/N/MANIFEST_PREFIX<k>.json
# holds (size, CRC-32) of the share of the step's files that process k read back.
MANIFEST_PREFIX = "checksums.process_"
SET_ASIDE_DIR = "checkpoints_set_aside"  # steps moved out of the way by a resume, never deleted


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, or from another model)."""


class SaveFailed(CheckpointError):
  """A checkpoint could not be written (a read-only or full disk, a vanished folder): the run
  ends on every process, since training on without saving would lose its work."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose files differ from what was written, or that holds non-finite values:
  a resume may fall back to an older step."""

  def __init__(self, step: int, where: str, reason: str):
    super().__init__(f"checkpoint {where} is corrupt: {reason}")
    self.step, self.reason = step, reason


def first_line(e: BaseException, limit: int = 300) -> str:
  """``Type: first line`` of an exception (TensorStore and Orbax errors run to dozens of lines)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else ""
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- Checksums ----------------------------------------------------------------------------------
def _file_checksum(path: str) -> tuple[int, int]:
  """(size, CRC-32) of a file, read in chunks (zlib releases the GIL, so threads overlap)."""
  crc = size = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 23):
      crc, size = zlib.crc32(chunk, crc), size + len(chunk)
  return size, crc


def _item_files(step_dir: str) -> list[str]:
  """Files of the step's item folders (``state/``, ``data/``) relative to the step folder; the
  step's top-level metadata files are Orbax's own and may be rewritten, so they are left out."""
  out = []
  for item in sorted(os.listdir(step_dir)):
    top = os.path.join(step_dir, item)
    if os.path.isdir(top):
      for root, _, files in os.walk(top):
        out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(out)


def _share(sizes: dict[str, int], index: int, count: int) -> list[str]:
  """The files process ``index`` of ``count`` reads: a greedy split by size that every process
  computes identically from the same listing."""
  loads, mine = [0] * count, []
  for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
    k = loads.index(min(loads))
    loads[k] += max(sizes[rel], 1)
    if k == index:
      mine.append(rel)
  return mine


def _checksums(step_dir: str, rels: list[str]) -> dict[str, tuple[int, int]]:
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    sums = pool.map(lambda r: _file_checksum(os.path.join(step_dir, r)), rels)
    return dict(zip(rels, sums))


# Processes agree through the coordination service of jax.distributed (key-value store and
# barriers, minutes of patience), not through gloo collectives, whose 30 s connection timeout a
# process still compiling or hashing can miss.
_SYNC_TIMEOUT_MS = 30 * 60 * 1000
_sync_ids = itertools.count()


def agree(reason: str | None) -> str | None:
  """The first process's non-empty reason, the same on every process (None if none has one).
  Every process must call it the same number of times; a failing process reports instead of
  leaving the others at a barrier."""
  if jax.process_count() == 1:
    return reason
  client = ocp.multihost.get_jax_distributed_client()
  key = f"mmsr_checkpoint_agree/{next(_sync_ids)}"
  client.key_value_set(f"{key}/{jax.process_index()}", "bad:" + reason if reason else "ok")
  for p in range(jax.process_count()):
    value = client.blocking_key_value_get(f"{key}/{p}", _SYNC_TIMEOUT_MS)
    if value.startswith("bad:"):
      return value[4:]
  return None


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.get_jax_distributed_client().wait_at_barrier(
        f"{name}/{next(_sync_ids)}", _SYNC_TIMEOUT_MS)


# --- Non-finite values --------------------------------------------------------------------------
def path_name(path) -> str:
  """``a.b.c`` for a tree path, whether its parts are dict keys or dataclass attributes."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


@functools.lru_cache(maxsize=None)
def _finite_flags(out_sharding):
  """One jitted function per output sharding (so each save does not compile it again)."""
  return jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]),
                 out_shardings=out_sharding)


def non_finite_leaf(tree) -> str | None:
  """The dotted path of the first floating-point array of ``tree`` that holds a NaN or an
  infinity (None if every one is finite). One jitted reduction over the (sharded) arrays; the
  answer is the same on every process."""
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return None
  arrays = tuple(x for _, x in leaves)
  sharding = next((x.sharding for x in arrays
                   if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
  out = None if sharding is None else jax.sharding.NamedSharding(sharding.mesh,
                                                                 jax.sharding.PartitionSpec())
  flags = _finite_flags(out)(arrays)
  flags = np.asarray(flags.addressable_data(0)) if isinstance(flags, jax.Array) else flags
  bad = np.flatnonzero(~np.asarray(flags, bool))
  return path_name(leaves[bad[0]][0]) if bad.size else None


# --- Checkpoints written before the layers were scanned -----------------------------------------
_PER_LAYER_KEY = re.compile(r"['\"](blocks|block)_\d+['\"]")


def is_per_layer(item_dir: str) -> bool:
  """Whether an Orbax item folder holds a tree with per-layer keys (``blocks_<i>``), the layout
  of runs saved before the DiT / MMLC / T5 layers were scanned."""
  try:
    with open(os.path.join(item_dir, "_METADATA")) as f:
      return bool(_PER_LAYER_KEY.search(f.read()))
  except OSError:
    return False


def _as_dicts(tree):
  """Lists and tuples (Orbax restores the optimizer's state tuple as a list) as ``{'0': ...}``
  dicts, the keys ``flax.serialization.to_state_dict`` gives them."""
  if isinstance(tree, dict):
    return {k: _as_dicts(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {str(i): _as_dicts(v) for i, v in enumerate(tree)}
  return tree


def restore_per_layer(item_dir: str, abstract, name: str | None = None):
  """Restores a per-layer tree (or its field ``name``) into the stacked layout of ``abstract``
  (its shapes, dtypes and shardings): read on the host, layers stacked, then placed."""
  meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if name is not None:
    tree = {name: tree[name]}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  raw = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=args, partial_restore=name is not None))
  if name is not None:
    raw = raw[name]
  flat = layout.stack_layers(traverse_util.flatten_dict(_as_dicts(raw), sep="/"))
  want = traverse_util.flatten_dict(serialization.to_state_dict(abstract), sep="/",
                                    keep_empty_nodes=True)  # e.g. optax's empty states
  empty = {k: v for k, v in want.items() if v is traverse_util.empty_node}
  arrays = {k: v for k, v in want.items() if k not in empty}
  flat = {k: v for k, v in flat.items() if k not in empty}  # saved as None / empty containers
  missing, extra = sorted(set(arrays) - set(flat)), sorted(set(flat) - set(arrays))
  if missing or extra:
    raise ValueError(f"restacked keys differ from the model's: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}")
  placed = dict(empty)
  for key, spec in arrays.items():
    arr = np.asarray(flat[key])
    if arr.shape != tuple(spec.shape):
      raise ValueError(f"{key}: saved shape {arr.shape}, model shape {tuple(spec.shape)}")
    placed[key] = jax.device_put(arr.astype(spec.dtype), spec.sharding)
  return serialization.from_state_dict(
      abstract, traverse_util.unflatten_dict(placed, sep="/"))


# --- The checkpointer ---------------------------------------------------------------------------
class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with ``state`` and ``data`` items.

  Each committed step gets a checksum manifest before anything older is rotated out, so the
  newest checkpoint that is known to be whole is never the one deleted; a restore checks the
  files against the manifest and the arrays for NaN / infinity.
  """

  def __init__(self, workdir: str, *, keep: int = 3, create: bool = True, log=None):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.keep = keep
    self._log = log  # told of every committed step
    self._pending: list[int] = []  # saved, not yet checksummed
    self._failed = False  # a save failed: nothing more is waited for or written
    # Rotation is done here (``_finish``), after the newer step's manifest is written. The step
    # folders are made in the calling thread: made in Orbax's background thread, a failure there
    # leaves the caller waiting for a signal that never comes.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=create,
            async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Starts saving ``step`` (committed in the background). Raises :class:`SaveFailed` on
    every process when any process cannot write it, or could not commit the previous save."""
    self._finish()  # the previous save: committed, checksummed, older steps rotated out
    # Each process first proves it can create a file where the step goes, and all agree: a
    # process that cannot must not leave the others inside Orbax's save barriers.
    try:
      with tempfile.TemporaryFile(dir=self.directory):
        pass
      reason = None
    except OSError as e:
      reason = f"{self.directory} cannot be written ({e.strerror or first_line(e)})"
    self._fail_if(agree(reason and f"process {jax.process_index()}: {reason}"), step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      saved, reason = self.manager.save(step, args=ocp.args.Composite(**items), force=force), None
    except Exception as e:  # noqa: BLE001 - reported as one line on every process
      saved, reason = False, f"process {jax.process_index()}: {first_line(e)}"
    self._fail_if(agree(reason), step)
    if saved:
      self._pending.append(step)
    return saved

  def _fail_if(self, reason: str | None, step: int | None) -> None:
    if reason is not None:
      self._failed = True
      last = self.latest_committed()
      raise SaveFailed(f"checkpoint {'' if step is None else f'{step} '}could not be saved to "
                       f"{self.directory}: {reason}; the last saved checkpoint "
                       f"({'none' if last is None else last}) is kept")

  def latest_committed(self) -> int | None:
    """The newest step with a checksum manifest (a save that finished)."""
    steps = [s for s in self.all_steps() if s not in self._pending and self.has_manifest(s)]
    return steps[-1] if steps else None

  def has_manifest(self, step: int) -> bool:
    return bool(glob.glob(os.path.join(self.step_dir(step), MANIFEST_PREFIX + "*.json")))

  def _finish(self) -> None:
    if self._failed:
      return  # the other processes may never commit that save: do not wait for it
    pending, self._pending = self._pending, []
    reason = None
    try:
      self.manager.wait_until_finished()
      for step in pending:
        self.write_manifest(step)
    except Exception as e:  # noqa: BLE001 - reported as one line on every process
      reason = f"process {jax.process_index()}: {first_line(e)}"
    if not pending:  # nothing was in flight (the same on every process)
      self._fail_if(reason, None)
      return
    self._fail_if(agree(reason), pending[-1])
    for step in pending:
      if self._log is not None:
        self._log(f"saved checkpoint {step} to {self.step_dir(step)}")
    steps = self.all_steps()
    for old in steps[:max(0, len(steps) - self.keep)]:
      self.manager.delete(old)

  def write_manifest(self, step: int) -> None:
    """Checksums this process's share of the committed files of ``step``."""
    step_dir = self.step_dir(step)
    rels = _item_files(step_dir)
    sizes = {r: os.path.getsize(os.path.join(step_dir, r)) for r in rels}
    mine = _share(sizes, jax.process_index(), jax.process_count())
    record = {"files_total": len(rels), "process_count": jax.process_count(),
              "files": {r: list(v) for r, v in _checksums(step_dir, mine).items()}}
    path = os.path.join(step_dir, f"{MANIFEST_PREFIX}{jax.process_index()}.json")
    with open(path + ".tmp", "w") as f:
      json.dump(record, f)
    os.replace(path + ".tmp", path)

  def check_files(self, step: int) -> tuple[bool, str | None]:
    """(whether ``step`` has a manifest, why its files are not the ones written or None).
    Every process checks a share of the files; the answer is the same on all of them."""
    step_dir = self.step_dir(step)
    reason, entries, total = None, {}, None
    manifests = sorted(glob.glob(os.path.join(step_dir, MANIFEST_PREFIX + "*.json")))
    if not manifests and not _item_files(step_dir):
      # Not a checkpoint at all: a save interrupted before it wrote anything (or emptied since).
      reason = "it holds no saved items and no checksum manifest"
    for m in manifests:
      try:
        with open(m) as f:
          record = json.load(f)
        entries.update({r: tuple(v) for r, v in record["files"].items()})
        total = record["files_total"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"its checksum manifest {os.path.basename(m)} is unreadable ({first_line(e)})"
    if manifests and reason is None and len(entries) != total:
      reason = (f"checksum manifests cover {len(entries)} of its {total} files (a process's "
                "manifest is missing)")
    if manifests and reason is None:
      mine = _share({r: v[0] for r, v in entries.items()}, jax.process_index(),
                    jax.process_count())
      present = [r for r in mine if os.path.isfile(os.path.join(step_dir, r))]
      missing = sorted(set(mine) - set(present))
      if missing:
        reason = f"{missing[0]} is missing"
      else:
        for rel, (size, crc) in _checksums(step_dir, present).items():
          if size != entries[rel][0]:
            reason = f"{rel} has {size} bytes but {entries[rel][0]} were written"
            break
          if crc != entries[rel][1]:
            reason = f"{rel} does not match the checksum written with it"
            break
    return bool(manifests), agree(reason)

  def unchecked_warning(self, step: int) -> str | None:
    """A warning when ``step`` has no checksum manifest although other steps have one (a save
    whose manifest was lost; its files cannot be checked), else None."""
    if self.has_manifest(step) or not _item_files(self.step_dir(step)):
      return None  # checked, or empty (then corrupt, which says more)
    others = [s for s in self.all_steps() if s != step and self.has_manifest(s)]
    if not others:
      return None  # saved before manifests existed, like the whole run
    return (f"warning: checkpoint {self.step_dir(step)} has no checksum manifest although "
            f"step(s) {', '.join(map(str, others))} have one: its files cannot be checked")

  def _restore_error(self, step: int, e: Exception, has_manifest: bool, what: str):
    where = self.step_dir(step)
    if has_manifest:
      return CheckpointError(
          f"checkpoint {where}: its {what} could not be restored into the current model although "
          f"its files are intact ({first_line(e)}); the config differs from the saved run's: "
          f"use {config_path(self.workdir)} or a new --workdir")
    older = [s for s in self.all_steps() if s < step]
    return CheckpointError(
        f"checkpoint {where}: its {what} could not be restored ({first_line(e)}); it has no "
        "checksum manifest, so a damaged file and a different config cannot be told apart: "
        "use the saved config, or an older step (train --restore_step, sample --step; older "
        f"steps: {older or 'none'})")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores ``state`` (onto the shardings in ``abstract_state``) and the iterator in place.

    Raises :class:`CorruptCheckpoint` when a file differs from what was written or an array is
    not finite, :class:`CheckpointError` when the arrays do not fit the current model.
    """
    where = self.step_dir(step)
    has_manifest, reason = self.check_files(step)
    if reason is not None:
      raise CorruptCheckpoint(step, where, reason)
    try:
      if is_per_layer(os.path.join(where, "state")):  # saved before the layers were scanned
        state = restore_per_layer(os.path.join(where, "state"), abstract_state)
      else:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # noqa: BLE001 - re-raised as one line; never a silent fresh start
      raise self._restore_error(step, e, has_manifest, "state") from e
    bad = non_finite_leaf(state)
    if bad is not None:
      raise CorruptCheckpoint(step, where, f"{bad} holds NaN or infinite values")
    if data_iterator is not None:
      try:
        self.manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {where}: the saved input-pipeline position does not fit the current "
            f"data settings ({first_line(e)}); resume with the data settings and seed of "
            f"{config_path(self.workdir)} or use a new --workdir") from e
    return state

  def restore_part(self, step: int, name: str, abstract_part):
    """Restores only the ``name`` field of the saved state (e.g. ``'ema_params'``) onto the
    shardings of ``abstract_part``; the other arrays (weights, optimizer moments) are never read
    (their files are still checksummed).

    Sampling needs the EMA weights alone: for an AdamW run they are a quarter of the state, so
    restoring them alone needs a quarter of the host and device memory of :meth:`restore`.
    """
    where = self.step_dir(step)
    has_manifest, reason = self.check_files(step)
    if reason is not None:
      raise CorruptCheckpoint(step, where, reason + self._older_hint(step))
    path = os.path.join(where, "state")
    target = {name: abstract_part}
    try:
      if is_per_layer(path):  # saved before the layers were scanned
        restored = {name: restore_per_layer(path, abstract_part, name)}
      else:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    except Exception as e:  # noqa: BLE001 - re-raised as one line
      raise self._restore_error(step, e, has_manifest, repr(name)) from e
    bad = non_finite_leaf(restored[name])
    if bad is not None:
      raise CorruptCheckpoint(step, where, f"{name}.{bad} holds NaN or infinite values"
                              + self._older_hint(step))
    return restored[name]

  def _older_hint(self, step: int) -> str:
    older = [s for s in self.all_steps() if s < step]
    return f" (older steps: {', '.join(map(str, older))})" if older else ""

  def set_aside(self, step: int, reason: str) -> str:
    """Moves ``step`` out of the checkpoints folder (never deletes it) to
    ``WORKDIR/checkpoints_set_aside/STEP[.n]`` with ``reason.txt``; returns where it went."""
    folder = os.path.join(self.workdir, SET_ASIDE_DIR)
    dst, n = os.path.join(folder, str(step)), 0
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(folder, f"{step}.{n}")
    _barrier(f"mmsr_set_aside_{step}_before")
    if jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
      shutil.move(self.step_dir(step), dst)
      with open(os.path.join(dst, "reason.txt"), "w") as f:
        f.write(reason + "\n")
    _barrier(f"mmsr_set_aside_{step}_after")
    self.manager.reload()
    return dst

  def wait(self):
    self._finish()

  def close(self):
    try:
      self._finish()
    finally:
      if not self._failed:  # closing waits for the failed save's background work
        self.manager.close()


def saved_steps(workdir: str) -> list[int]:
  """The step folders under ``WORKDIR/checkpoints`` (without opening a manager)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n)))


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
    return tasks.with_defaults(json.load(f))


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
  """Raises if a field a resume may not change (architecture, seed) differs (names the first)."""
  for field in tasks.resume_fields(config):
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
