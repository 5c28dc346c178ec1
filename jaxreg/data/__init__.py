"""Datasets through tensorflow-datasets, held whole as uint8 arrays.

Small image datasets (MNIST, CIFAR, SVHN) fit in accelerator memory, so a
split is read once into a uint8 array and every later stage (shuffling,
augmentation, standardization) happens on the device inside the jitted step.

Preparation: TFDS downloads and prepares the dataset (array_record format) on
first use. Without internet, put the official files in a manual directory
(`config.dataset.manual_dir`, or `$JAXREG_MANUAL_DIR/<name>`) and TFDS prepares
from them. Reading uses `builder.as_data_source`, which needs no TensorFlow.

When things fail (all under the per-dataset lock
`<data_dir>/downloads/<name>.lock`):
* Missing data: TFDS first prepares with downloads refused; only when a file
  is neither in the manual directory nor in TFDS's download cache is the
  network probed, once and briefly (PROBE_TIMEOUT_S). Unreachable: refused in
  seconds (DatasetMissingError) naming the files, the exact folder to put them
  in and the settings that move it; reachable: TFDS downloads as before.
* Damage: each split's .npz cache has a checksum file beside it
  (`jaxreg-<split>.npz.json`: size, each member's CRC-32, sha256); a damaged
  cache is rebuilt from the prepared records, which are themselves read
  through once, guarded, to build it (and counted against dataset_info). A
  damaged record file is rebuilt from the source files when they are at hand
  (manual directory, TFDS download cache, or internet); otherwise
  DatasetCorruptError names the file, the folder to delete and the files needed.
* Temporary files left by killed writers (the cache's `.jaxreg-*.npz.*`,
  TFDS's `incomplete.*` and `*.tmp.<uuid>` names) are removed by the next run
  that takes the lock.

Modules: catalog (the tested datasets' official files and shapes),
preparation (the TFDS builder, offline refusal, the missing-data message),
records (reading and rebuilding the prepared files), cache (the checksummed
.npz cache), locking (the lock and leftover clean-up), loading (all of it in
order, per dataset).
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from jaxreg.data import catalog
from jaxreg.data import loading
from jaxreg.data import preparation
from jaxreg.data import records

MANUAL_DIR_ENV = preparation.MANUAL_DIR_ENV
OFFICIAL_FILES = catalog.OFFICIAL_FILES
PROBE_TIMEOUT_S = preparation.PROBE_TIMEOUT_S
DatasetMissingError = preparation.DatasetMissingError
DatasetCorruptError = records.DatasetCorruptError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Whole splits as uint8 NHWC images and int32 labels, host memory."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  # Per-channel statistics of the training split, on the [0, 1] scale.
  mean: np.ndarray
  std: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @property
  def has_val(self) -> bool:
    return len(self.val_labels) > 0


def resolve_manual_dir(cfg: ml_collections.ConfigDict) -> str | None:
  if cfg.manual_dir:
    return os.path.abspath(cfg.manual_dir)
  root = os.environ.get(MANUAL_DIR_ENV)
  if not root:
    return None
  path = os.path.abspath(os.path.join(root, cfg.name))
  # The variable may cover only some datasets; the others download as usual.
  return path if os.path.isdir(path) else None


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks the dataset options without touching any file."""
  if not 0.0 <= cfg.val_fraction < 1.0:
    raise ValueError(
        f"config.dataset.val_fraction={cfg.val_fraction} must be in [0, 1)")
  for key in ("train_size", "test_size"):
    if cfg[key] < 0:
      raise ValueError(f"config.dataset.{key}={cfg[key]} must be >= 0 "
                       "(0 keeps the whole split)")


def info(cfg: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """(image shape HWC, number of classes) that `load(cfg)` gives, without
  reading or preparing any data: from a table for the datasets jaxreg is
  tested with, else from the TFDS builder's features (TFDS is imported, no
  data is read). An unknown name raises the ValueError `load` raises."""
  if cfg.name in catalog.SHAPES:
    return catalog.SHAPES[cfg.name]
  features = preparation.builder(cfg).info.features
  try:
    shape, num_classes = features["image"].shape, features["label"].num_classes
  except (KeyError, AttributeError) as e:
    raise ValueError(
        f"config.dataset.name={cfg.name!r} is not an image classification "
        f"dataset with 'image' and a class 'label' feature ({e!r})") from None
  shape = tuple(shape) + ((1,) if len(shape) == 2 else ())
  if len(shape) != 3 or None in shape:
    raise ValueError(f"config.dataset.name={cfg.name!r} has images of shape "
                     f"{features['image'].shape}; jaxreg needs one fixed size")
  return shape, int(num_classes)


def load(cfg: ml_collections.ConfigDict) -> Dataset:
  """Loads `cfg.name` through TFDS, preparing it first if needed.

  The validation split is a seeded random `val_fraction` of the training
  split; statistics come from what remains for training.
  """
  validate(cfg)
  (train_x, train_y), (test_x, test_y), names = loading.load_splits(
      cfg.name, cfg.data_dir, resolve_manual_dir(cfg))
  order = np.random.default_rng(cfg.split_seed).permutation(len(train_y))
  n_val = int(round(cfg.val_fraction * len(train_y)))
  val_idx, train_idx = order[:n_val], order[n_val:]
  if cfg.train_size:
    train_idx = train_idx[:cfg.train_size]
  if cfg.test_size:
    test_x, test_y = test_x[:cfg.test_size], test_y[:cfg.test_size]
  train_x_split = train_x[np.sort(train_idx)]
  scaled = train_x_split.astype(np.float64) / 255.0
  mean = scaled.mean(axis=(0, 1, 2))
  std = scaled.std(axis=(0, 1, 2))
  return Dataset(
      name=cfg.name,
      train_images=train_x_split,
      train_labels=train_y[np.sort(train_idx)],
      val_images=train_x[np.sort(val_idx)],
      val_labels=train_y[np.sort(val_idx)],
      test_images=test_x,
      test_labels=test_y,
      mean=mean.astype(np.float32),
      std=np.maximum(std, 1e-8).astype(np.float32),
      num_classes=len(names),
      class_names=names,
  )
