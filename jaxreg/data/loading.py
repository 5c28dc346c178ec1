"""Whole train and test splits of a dataset, prepared first if needed, under
the dataset's lock; cached per process."""
from __future__ import annotations

import functools
from pathlib import Path

import ml_collections

from jaxreg.data import cache
from jaxreg.data import locking
from jaxreg.data import preparation
from jaxreg.data import records


@functools.lru_cache(maxsize=4)
def load_splits(name: str, data_dir: str | None, manual_dir: str | None):
  """((train images, labels), (test images, labels), class names)."""
  import tensorflow_datasets as tfds
  cfg = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir))
  builder = preparation.builder(cfg)
  # A download directory per dataset: TFDS extracts manual files into
  # <download_dir>/extracted under their own names, and MNIST and
  # Fashion-MNIST ship files of the same names, so a shared directory hands
  # the second dataset prepared the first one's images.
  download_dir = Path(builder.data_dir).parents[1] / "downloads" / name
  lock = locking.lock_path(download_dir)
  # Processes sharing a data_dir (side-by-side sweep workers, parallel test
  # workers) prepare one at a time; the others then find it prepared.
  with locking.file_lock(lock) as locked:
    if locked:
      locking.remove_leftovers(download_dir.parents[1] / name, download_dir)
    preparation.prepare(cfg, builder, manual_dir, download_dir)
  for attempt in range(2):
    # A fresh builder reads what was prepared, by this process or another.
    builder = preparation.builder(cfg)
    try:
      train = cache.read_split(builder, "train", lock)
      test = cache.read_split(builder, "test", lock)
      break
    except records.DamagedRecords as damaged:
      if attempt:
        raise records.DatasetCorruptError(
            f"{damaged.path} (prepared {name!r}) is damaged ({damaged.why}) "
            f"even after preparing it again; delete {damaged.data_dir} and "
            f"rerun.") from None
      with locking.file_lock(lock):
        records.rebuild_prepared(cfg, damaged, manual_dir, download_dir)
  label = builder.info.features["label"]
  names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) \
      else tuple(str(i) for i in range(int(train[1].max()) + 1))
  return train, test, names
