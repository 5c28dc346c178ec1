"""The per-dataset lock, and removal of what killed writers left behind."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
import re
import shutil


@contextlib.contextmanager
def file_lock(path: Path):
  """An exclusive advisory lock on `path` across processes (POSIX); yields
  whether it is held (False where fcntl or the directory is unavailable:
  then nothing that another process may be writing is touched)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
  except (ImportError, OSError) as e:
    logging.info("preparing without a lock (%s)", e)
    yield False
    return
  with handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield True
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(download_dir: Path) -> Path:
  return download_dir.parent / f"{download_dir.name}.lock"


# Temporary names of writers that rename their output into place when done:
# results.write_atomic's mkstemp names for the cache and its checksum, TFDS's
# incomplete_dir / incomplete_file(s) / extraction names, and TFDS's
# per-download folders.
_CACHE_TEMP = re.compile(r"\.jaxreg-[^/]+\.npz(\.json)?\..+")
_TFDS_TEMP = re.compile(r"incomplete\..+")
_DOWNLOAD_TEMP = re.compile(r".+\.tmp\.[0-9a-f]{32}")


def _remove(path: Path) -> None:
  try:
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    else:
      path.unlink()
    logging.warning("removed %s, left by a killed writer", path)
  except OSError as e:
    logging.info("could not remove leftover %s: %s", path, e)


def remove_leftovers(dataset_dir: Path, download_dir: Path) -> None:
  """Deletes what killed writers left. Only called with the dataset's lock
  held, and every jaxreg writer of these folders holds it, so none of these
  names can belong to a live writer."""
  def scan(folder: Path, depth: int):
    try:
      entries = list(folder.iterdir())
    except OSError:
      return
    for entry in entries:
      if _CACHE_TEMP.fullmatch(entry.name) or _TFDS_TEMP.fullmatch(entry.name):
        _remove(entry)
      elif depth > 1 and entry.is_dir() and not entry.is_symlink():
        scan(entry, depth - 1)  # <name>/<config>/<version>/
  scan(dataset_dir, 3)
  for entry in (list(download_dir.iterdir()) if download_dir.is_dir() else []):
    if _DOWNLOAD_TEMP.fullmatch(entry.name):
      _remove(entry)
  extracted = download_dir / "extracted"
  for entry in (list(extracted.iterdir()) if extracted.is_dir() else []):
    if _TFDS_TEMP.fullmatch(entry.name) or entry.name.endswith(".todelete"):
      _remove(entry)
