"""File locks on a sweep's workdir, so jobs sharing it never collide.

Several jobs (SLURM array tasks, Kubernetes pods, two launches by hand) may
run one sweep into one `--workdir`. Each variant's training is guarded by an
exclusive `fcntl.flock` on `<workdir>/.locks/<variant>.lock` (the name made
filesystem-safe: replicas are named `<variant>/seed=K`). A job that finds a
variant held skips it and comes back to it, waiting, after its other
variants; it then prepares the variant again (another job may have finished
it meanwhile). Rebuilding summary.csv holds `<workdir>/.locks/summary.csv.lock`.

The kernel drops a flock when its holder dies (SIGKILL included), so a killed
job's lock is taken over by the next job that asks. The holder writes its
host and pid into the lock file and empties it on release: a non-empty file
found on acquiring names the dead holder whose lock was recovered.

Every acquire and release of a variant lock is appended as one JSON line to
`<workdir>/.locks/log.jsonl` (lock, event, host, pid, time, recovered
holder): the record that no variant was held by two jobs at once.

flock works across hosts on NFSv4 (Linux maps it to byte-range locks) and on
Lustre mounted with `flock`; on a filesystem without it, `acquire` raises.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

LOCK_DIR = ".locks"
LOG_NAME = "log.jsonl"
TABLE_LOCK = "summary.csv"
# Lock file names keep a variant's readable characters; the rest become "_"
# and a digest of the full name keeps two names apart.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_STEM = 180  # Well under the 255 bytes of a file name.


def safe_name(name: str) -> str:
  """A file name for the lock of `name`, distinct for distinct names.

  `"norm=batch/seed=1"` -> `"norm=batch_seed=1.<10 hex digits>"`; a name of
  only safe characters (and not too long) stays as it is.
  """
  stem = _UNSAFE.sub("_", name)
  if stem == name and len(stem) <= _MAX_STEM and not name.startswith("."):
    return name
  digest = hashlib.sha256(name.encode()).hexdigest()[:10]
  return f"{stem.lstrip('.')[:_MAX_STEM]}.{digest}"


def lock_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / LOCK_DIR


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid()}


def _append_log(workdir: str | os.PathLike, record: dict) -> None:
  line = (json.dumps({**record, **_holder(), "time": time.time()}) +
          "\n").encode()
  # One write(2) of one short line with O_APPEND: lines of several processes
  # never interleave.
  fd = os.open(lock_dir(workdir) / LOG_NAME,
               os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    os.write(fd, line)
  finally:
    os.close(fd)


class FileLock:
  """An exclusive lock on `<workdir>/.locks/<safe_name(name)>.lock`.

  `acquire(blocking=False)` tries once; a blocking acquire waits for the
  holder to release it or die. `log` appends each acquire and release to the
  workdir's lock log.
  """

  def __init__(self, workdir: str | os.PathLike, name: str, *,
               log: bool = True):
    self.workdir = Path(workdir)
    self.name = name
    self.path = lock_dir(workdir) / f"{safe_name(name)}.lock"
    self.log = log
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self, blocking: bool = True) -> bool:
    """Takes the lock; False when not `blocking` and another job holds it."""
    if self._fd is not None:
      return True
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      return False
    except BaseException:
      os.close(fd)
      raise
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    self._fd = fd
    if self.log:
      try:
        recovered = json.loads(previous) if previous else None
      except ValueError:  # Killed while writing its name.
        recovered = {"unreadable": previous}
      _append_log(self.workdir, {"lock": self.name, "event": "acquired",
                                 "recovered": recovered})
    return True

  def release(self) -> None:
    if self._fd is None:
      return
    if self.log:
      # Logged before the flock goes: the next holder's "acquired" line
      # always comes after this one.
      _append_log(self.workdir, {"lock": self.name, "event": "released"})
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> FileLock:
    self.acquire(blocking=True)
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock_all(workdir: str | os.PathLike, names: Sequence[str],
             blocking: bool) -> list[FileLock] | None:
  """The locks of every name (a stacked group's members), taken in sorted
  order so two jobs waiting for overlapping groups never deadlock. Not
  `blocking`: all or none, None (keeping none) when another job holds one."""
  held: list[FileLock] = []
  for name in sorted(names):
    lock = FileLock(workdir, name)
    if not lock.acquire(blocking=blocking):
      release_all(held)
      return None
    held.append(lock)
  return held


def release_all(held: Sequence[FileLock]) -> None:
  for lock in reversed(held):
    lock.release()


def each_locked(workdir: str | os.PathLike, items: Sequence[T],
                names: Callable[[T], Sequence[str]], *, enabled: bool = True,
                on_held: Callable[[T], None] = lambda item: None
                ) -> Iterator[T]:
  """Yields each of `items` with the locks of `names(item)` held, released
  when the loop moves on (close the generator, e.g. with
  contextlib.closing, to release them on an early exit too).

  First every item whose locks are free, in order; one another job holds is
  reported to `on_held` and comes back, waited for, after all the others,
  so a job spends no time waiting while it has work, and an item whose
  holder dies is taken over. Not `enabled`: each item, no lock taken.
  """
  deferred: list[T] = []
  for blocking, todo in ((False, items), (True, deferred)):
    for item in todo:
      held = lock_all(workdir, names(item), blocking) if enabled else []
      if held is None:
        on_held(item)
        deferred.append(item)
        continue
      try:
        yield item
      finally:
        release_all(held)


def maybe_lock(workdir: str | os.PathLike, name: str, enabled: bool = True):
  """The lock of `name` as a context manager (waiting for it), or nothing."""
  return FileLock(workdir, name) if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def table_lock(workdir: str | os.PathLike, enabled: bool = True
               ) -> Iterator[None]:
  """Held while summary.csv or sweep.json is rebuilt from the disk: the
  last of several writers read every other's results, so no row is lost.
  Not `enabled` (a process that writes no files): no lock."""
  if not enabled:
    yield
    return
  with FileLock(workdir, TABLE_LOCK, log=False):
    yield


def read_log(workdir: str | os.PathLike) -> list[dict]:
  """Every acquire/release record of the workdir's variant locks, in order."""
  path = lock_dir(workdir) / LOG_NAME
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def overlaps(log: Sequence[dict]) -> list[str]:
  """Where the log shows a lock taken while another process held it (the
  proof that none was): one line per violation, [] when there is none.

  A holder that died without a "released" line is taken to have held the
  lock until the next "acquired", which must then name it as recovered.
  """
  holder: dict[str, dict] = {}
  problems = []
  for r in log:
    name, who = r["lock"], (r["host"], r["pid"])
    if r["event"] == "acquired":
      prev = holder.get(name)
      if prev is not None:
        rec = r.get("recovered") or {}
        if (rec.get("host"), rec.get("pid")) != (prev["host"], prev["pid"]):
          problems.append(f"{name}: {who} acquired it while {prev['host']}, "
                          f"{prev['pid']} held it")
      holder[name] = r
    elif r["event"] == "released":
      prev = holder.pop(name, None)
      if prev is None or (prev["host"], prev["pid"]) != who:
        problems.append(f"{name}: released by {who}, which did not hold it")
  return problems
