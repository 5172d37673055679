"""What a run may write, checked before any long work: every folder it writes is writable, and
it is the only writer of its workdir (a lock naming the holder's host, pid and start time).

The lock is ``WORKDIR/writer.lock``, held with ``flock`` for the life of the process and filled
with the holder's record. The kernel drops the ``flock`` when the holder dies however it dies; a
record left behind (the holder was killed before it could empty the file) is then a stale lock,
taken over with a warning. While held, the file's mtime is refreshed every
:data:`HEARTBEAT_S` seconds, so that a record from another host whose lock this machine cannot
see (a filesystem whose locks stay on one host) still blocks while it is fresh.
What this promises on which filesystem is in docs/training.md ("One writer per workdir").
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time

LOCK_FILE = "writer.lock"
HEARTBEAT_S = 30.0
# A record from another host whose heartbeat is older than this is taken to be dead (its host's
# clock may differ from ours by a little: this is minutes, not seconds).
STALE_AFTER_S = 300.0


class WorkdirLocked(OSError):
  """Another process is writing the workdir."""


# --- Writable folders ---------------------------------------------------------------------------
def check_writable(folder: str, flag: str, value: str | None = None) -> None:
  """OSError naming ``flag`` (set to ``value``, default ``folder``) now, before any long work,
  when ``folder`` (made later if missing) cannot be written: a read-only or full disk, or a file
  where a folder should be."""
  shown = f"{flag}={folder if value is None else value}"
  probe = os.path.abspath(folder)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise NotADirectoryError(f"{shown}: {probe} is a file, not a folder")
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise OSError(f"{shown}: {probe} cannot be written ({e.strerror or e})") from e


# --- The lock -----------------------------------------------------------------------------------
def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def _describe(record: dict) -> str:
  return (f"{record.get('what', 'a process')} on host {record.get('host', '?')}, pid "
          f"{record.get('pid', '?')}, started {record.get('started', '?')}")


def _read_record(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 1 << 16):
    raw += chunk
  if not raw.strip():
    return None
  try:
    record = json.loads(raw)
  except ValueError:
    record = None
  return record if isinstance(record, dict) else {"what": "an unreadable lock record"}


class _Held:
  def __init__(self, path: str, fd: int):
    self.path, self.fd, self.pid = path, fd, os.getpid()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.fd)
      except OSError:
        pass  # a heartbeat that fails only makes the lock look older to other hosts

  def release(self) -> None:
    self._stop.set()
    if os.getpid() != self.pid:  # a forked child (an input worker) never frees its parent's lock
      return
    try:
      os.ftruncate(self.fd, 0)  # an empty file: released, not stale
    except OSError:
      pass
    try:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    finally:
      os.close(self.fd)


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def acquire(workdir: str, what: str, log=print) -> None:
  """Makes this process the writer of ``workdir`` (created if missing) until :func:`release`
  or exit; a no-op when this process holds it already. Raises :class:`WorkdirLocked` naming the holder when
  another process writes it; ``log`` gets the warning when a stale lock is taken over."""
  path = os.path.abspath(lock_path(workdir))
  with _guard:
    if path in _held:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
          raise
        record = _read_record(fd) or {}
        raise WorkdirLocked(
            f"--workdir={workdir} is in use by {_describe(record)} ({path}); one process "
            "writes a run at a time: wait for it to end or use another --workdir") from None
      record = _read_record(fd)
      if record is not None:
        age = time.time() - os.fstat(fd).st_mtime
        if record.get("host") != socket.gethostname() and age < STALE_AFTER_S:
          # Its flock may live on its own host only; its heartbeat says it may be running.
          raise WorkdirLocked(
              f"--workdir={workdir} is in use by {_describe(record)} ({path}, refreshed "
              f"{age:.0f} s ago; another host's lock is taken to be dead after "
              f"{STALE_AFTER_S:.0f} s without a refresh): wait for it to end or use another "
              "--workdir")
        log(f"warning: taking over the lock of {_describe(record)} ({path}): that process "
            "ended without releasing it")
      started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      mine = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
              "started": started, "command": " ".join(sys.argv)[:500]}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    _held[path] = _Held(path, fd)


def release(workdir: str) -> None:
  """Frees this process's lock of ``workdir`` (a no-op when it holds none)."""
  path = os.path.abspath(lock_path(workdir))
  with _guard:
    held = _held.pop(path, None)
    if held is not None:
      held.release()


@atexit.register
def _release_all() -> None:
  with _guard:
    for held in _held.values():
      held.release()
    _held.clear()


def holds(workdir: str) -> bool:
  """Whether this process holds the lock of ``workdir``."""
  return os.path.abspath(lock_path(workdir)) in _held
