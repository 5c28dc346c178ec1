"""Each split read once into a .npz cache beside the prepared records, with a
checksum file; a damaged cache is rebuilt from the records."""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
import zipfile

import numpy as np

from jaxreg.data import locking
from jaxreg.data import preparation
from jaxreg.data import records

# Bump when the cache's layout changes: older caches are then rebuilt.
_CACHE_FORMAT = 1


def _cache_paths(builder, split: str) -> tuple[Path, Path]:
  """The split's cache, `jaxreg-<split>.npz`, and its checksum file."""
  cache = Path(builder.data_dir) / f"jaxreg-{split}.npz"
  return cache, cache.with_name(cache.name + ".json")


def _check_arrays(images, labels, expected: int | None) -> str | None:
  if images.dtype != np.uint8 or images.ndim != 4:
    return f"images are {images.dtype} of shape {images.shape}"
  if labels.ndim != 1 or len(labels) != len(images):
    return f"{len(images)} images but labels of shape {labels.shape}"
  if expected is not None and len(labels) != expected:
    return f"{len(labels)} examples where the split has {expected}"
  return None


def _zip_members(zf: zipfile.ZipFile) -> dict[str, list[int]]:
  return {i.filename: [i.CRC, i.file_size] for i in zf.infolist()}


def _read_cache(builder, split: str):
  """(arrays, problem): arrays None when there is no usable cache; problem
  None when the cache matched its checksum file, "unverified" when it has
  none yet (the zip's own CRCs then held), else why it is damaged.

  The check costs nothing over today's read: the checksum file pins the size
  and every member's CRC-32, and zipfile verifies each CRC-32 over the bytes
  as np.load reads them. (A sha256 of the whole file, also recorded, would
  cost another ~45 ms per MNIST load; it is for `sha256sum`-style checks.)"""
  cache, meta = _cache_paths(builder, split)
  try:
    record = json.loads(meta.read_text())
  except FileNotFoundError:
    record = None
  except (OSError, ValueError) as e:
    return None, f"its checksum file {meta} is unreadable ({e})"
  try:
    size = cache.stat().st_size
    with np.load(cache) as z:
      if record is not None:
        if record.get("format") != _CACHE_FORMAT:
          return None, f"{meta} is of another format"
        members = _zip_members(z.zip)
        if size != record.get("bytes") or members != record.get("members"):
          return None, (f"{size} bytes holding {members}, where {meta} "
                        f"records {record.get('bytes')} bytes holding "
                        f"{record.get('members')} (name: [crc32, size])")
      # Reading a member through checks its CRC-32 (zipfile.BadZipFile).
      images, labels = z["images"], z["labels"]
  except FileNotFoundError:
    return None, "missing"
  except Exception as e:  # BadZipFile, KeyError, ValueError, EOFError...
    return None, f"{type(e).__name__}: {e}"
  bad = _check_arrays(images, labels, records.expected_examples(builder, split))
  if bad:
    return None, bad
  return (images, labels), ("unverified" if record is None else None)


def _write_cache(builder, split: str, images, labels) -> None:
  """The cache, then its checksum file, each written atomically (a temporary
  name renamed into place); call with the lock held."""
  cache, meta = _cache_paths(builder, split)
  try:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    raw = buf.getvalue()
    from jaxreg import results  # pylint: disable=g-import-not-at-top
    # Written beside the prepared records: the cache dies with them.
    results.write_atomic(cache, raw)
    _write_checksum(meta, raw)
  except OSError as e:  # A read-only data_dir only loses the speed-up.
    logging.info("not caching %s: %s", cache, e)


def _write_checksum(meta: Path, raw: bytes) -> None:
  from jaxreg import results  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(io.BytesIO(raw)) as zf:
    members = _zip_members(zf)
  results.write_atomic(meta, json.dumps(dict(
      format=_CACHE_FORMAT, bytes=len(raw), members=members,
      sha256=hashlib.sha256(raw).hexdigest())) + "\n")


def read_split(builder, split: str,
               lock: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split, via a verified .npz cache beside the records.

  A damaged cache is not an error: it is derived data, rebuilt here from the
  prepared records (which are read through, guarded, to do so)."""
  # Only a really prepared dataset gets a cache (not a mocked one in tests).
  if not preparation.is_prepared(builder):
    return records.read_records(builder, split)
  arrays, problem = _read_cache(builder, split)
  if problem is None:
    return arrays
  with locking.file_lock(lock):
    # Another process may have written or repaired it meanwhile.
    arrays, problem = _read_cache(builder, split)
    if problem is None:
      return arrays
    cache, meta = _cache_paths(builder, split)
    if problem == "unverified":  # Written before checksums, or killed between.
      try:
        _write_checksum(meta, cache.read_bytes())
      except OSError as e:
        logging.info("no checksum for %s: %s", cache, e)
      return arrays
    if problem != "missing":
      logging.warning("the data cache %s is damaged (%s); rebuilding it from "
                      "the prepared records", cache, problem)
    images, labels = records.read_records(builder, split)
    _write_cache(builder, split, images, labels)
    return images, labels
