"""The prepared array_record files: read whole, checked against
dataset_info.json, traced to the damaged file, and prepared again from the
source files when they are at hand."""
from __future__ import annotations

import logging
import os
from pathlib import Path
import shutil

import numpy as np

from jaxreg.data import preparation


class DatasetCorruptError(RuntimeError):
  """A prepared dataset file is damaged and cannot be rebuilt here."""


class DamagedRecords(Exception):
  """A prepared record file of the dataset cannot be read."""

  def __init__(self, path: Path, why: str, data_dir: Path):
    super().__init__(f"{path}: {why}")
    self.path, self.why, self.data_dir = path, why, data_dir
    try:
      self.identity = os.stat(data_dir).st_ino
    except OSError:
      self.identity = None


def expected_examples(builder, split: str) -> int | None:
  try:
    return int(builder.info.splits[split].num_examples) or None
  except Exception:  # pylint: disable=broad-except
    return None


def _split_files(builder, split: str) -> list[Path]:
  try:
    return [Path(os.fspath(p)) for p in builder.info.splits[split].filepaths]
  except Exception:  # pylint: disable=broad-except
    return sorted(Path(builder.data_dir).glob(f"*-{split}.array_record*"))


def _find_damaged_file(builder, split: str) -> tuple[Path, str] | None:
  """The first record file of `split` that cannot be read through, and why."""
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  for path in _split_files(builder, split):
    if not path.exists():
      return path, "the file is missing"
    try:
      reader = array_record_module.ArrayRecordReader(str(path))
      try:
        n = reader.num_records()
        for start in range(0, n, 4096):
          reader.read(start, min(n, start + 4096))
      finally:
        reader.close()
    except Exception as e:  # pylint: disable=broad-except
      return path, f"{type(e).__name__}: {e}"
  return None


def read_records(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split from the prepared records. On a prepared dataset a
  failure is traced to the record file that cannot be read (DamagedRecords);
  other failures (e.g. no image decoder installed) pass through."""
  prepared = preparation.is_prepared(builder)
  try:
    source = builder.as_data_source(split)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # pylint: disable=broad-except
    if not prepared:
      raise
    damaged = _find_damaged_file(builder, split)
    if damaged is None:
      raise
    raise DamagedRecords(damaged[0], damaged[1],
                         Path(builder.data_dir)) from e
  expected = expected_examples(builder, split) if prepared else None
  if expected is not None and len(examples) != expected:
    files = _split_files(builder, split)
    raise DamagedRecords(
        files[0] if len(files) == 1 else Path(builder.data_dir),
        f"{len(examples)} examples where dataset_info.json records {expected}",
        Path(builder.data_dir))
  images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  labels = np.asarray([e["label"] for e in examples], np.int32)
  if images.ndim == 3:  # Grayscale stored without a channel axis.
    images = images[..., None]
  return images, labels


def rebuild_prepared(cfg, damaged: DamagedRecords, manual_dir: str | None,
                     download_dir: Path) -> None:
  """Prepares the dataset again in place of its damaged files (call with the
  lock held).

  Rebuild rather than refuse: the record files are derived from the source
  files, so they are regenerated whenever the sources are at hand (in the
  manual folder, in TFDS's download cache, or reachable online). Otherwise
  the damaged files are put back and DatasetCorruptError names the damaged
  file, what to delete and what to provide.
  """
  data_dir = damaged.data_dir
  try:
    if os.stat(data_dir).st_ino != damaged.identity:
      return  # Another process has prepared it again meanwhile.
  except OSError:
    pass
  logging.warning("%s is damaged (%s); preparing %r again from its source "
                  "files", damaged.path, damaged.why, cfg.name)
  # Set aside under a TFDS temporary name: a run killed meanwhile leaves it
  # to the next run's clean-up, and the dataset is then simply not prepared.
  aside = data_dir.with_name(
      f"incomplete.jaxreg-damaged-{os.getpid()}_{data_dir.name}")
  try:
    os.rename(data_dir, aside)
  except OSError as e:
    raise DatasetCorruptError(
        f"{damaged.path} (prepared {cfg.name!r}) is damaged ({damaged.why}) "
        f"and {data_dir} cannot be moved aside to prepare it again ({e}); "
        f"delete {data_dir} and rerun.") from None
  # Extraction results are regenerated from the (checksummed) source files.
  shutil.rmtree(download_dir / "extracted", ignore_errors=True)
  try:
    preparation.tfds_prepare(cfg, manual_dir, download_dir)
  except Exception as e:  # pylint: disable=broad-except
    if not data_dir.exists():
      os.rename(aside, data_dir)
    why = (str(e) if isinstance(e, preparation.Offline)
           else f"{type(e).__name__}: {e}")
    raise DatasetCorruptError(
        f"{damaged.path} (prepared {cfg.name!r}) is damaged ({damaged.why}) "
        f"and could not be prepared again: {why}. jaxreg prepares it again "
        f"by itself once the source files are at hand. "
        + preparation.files_and_folder(preparation.builder(cfg), cfg.name,
                                       manual_dir, download_dir)
        + f" Or delete {data_dir} and rerun with internet.") from None
  shutil.rmtree(aside, ignore_errors=True)
