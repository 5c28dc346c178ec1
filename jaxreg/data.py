"""Datasets through tensorflow-datasets, held whole as uint8 arrays.

Small image datasets (MNIST, CIFAR, SVHN) fit in accelerator memory, so a
split is read once into a uint8 array and every later stage (shuffling,
augmentation, standardization) happens on the device inside the jitted step.

Preparation: TFDS downloads and prepares the dataset (array_record format) on
first use. Without internet, put the official files in a manual directory
(`config.dataset.manual_dir`, or `$JAXREG_MANUAL_DIR/<name>`) and TFDS prepares
from them. Reading uses `builder.as_data_source`, which needs no TensorFlow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

MANUAL_DIR_ENV = "JAXREG_MANUAL_DIR"

# The files TFDS expects in a manual directory, as their publishers name them,
# so a missing dataset can be refused with the exact list of what to fetch.
OFFICIAL_FILES = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "fashion_mnist": ("train-images-idx3-ubyte.gz",
                      "train-labels-idx1-ubyte.gz",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "cifar10": ("cifar-10-binary.tar.gz",),
    "cifar100": ("cifar-100-binary.tar.gz",),
    "svhn_cropped": ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
}


def default_config() -> ml_collections.ConfigDict:
  """config.dataset."""
  return ml_collections.ConfigDict(dict(
      name="mnist",
      # None: TFDS's own default, which honours $TFDS_DATA_DIR.
      data_dir=config_dict.placeholder(str),
      # None: $JAXREG_MANUAL_DIR/<name> when that directory exists.
      manual_dir=config_dict.placeholder(str),
      # Fraction of the training split held out for validation.
      val_fraction=0.0,
      split_seed=0,
      # Keep only the first N examples (after the seeded shuffle); 0 = all.
      # For smoke runs and tests.
      train_size=0,
      test_size=0,
  ))


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


def _missing_data_message(name: str, manual_dir: str | None,
                          cause: Exception) -> str:
  files = OFFICIAL_FILES.get(name)
  what = (", ".join(files) if files else
          "the files listed in the TFDS catalog page of this dataset")
  where = (f"into {manual_dir}" if manual_dir else
           f"into a directory D and set ${MANUAL_DIR_ENV} to its parent "
           f"(TFDS then reads D=${MANUAL_DIR_ENV}/{name}) or "
           f"--config.dataset.manual_dir=D")
  return (f"dataset {name!r} is not prepared and could not be prepared "
          f"({type(cause).__name__}: {cause}). Without internet, put the "
          f"official files ({what}) {where}; with internet, TFDS downloads "
          f"them itself.")


def _builder(cfg: ml_collections.ConfigDict):
  import tensorflow_datasets as tfds  # Heavy import; only when data is needed.
  try:
    return tfds.builder(cfg.name, data_dir=cfg.data_dir,
                        file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown dataset {cfg.name!r} for config.dataset.name; jaxreg is "
        f"tested with {', '.join(OFFICIAL_FILES)} (any TFDS image "
        f"classification dataset with 'image' and 'label' features works). "
        f"TFDS said: {str(e).splitlines()[0]}") from None


def _prepare(builder, name: str, manual_dir: str | None) -> None:
  import tensorflow_datasets as tfds
  if manual_dir is not None:
    files = OFFICIAL_FILES.get(name, ())
    missing = [f for f in files if not os.path.exists(os.path.join(manual_dir, f))]
    already = _is_prepared(builder)
    if missing and not already:
      raise FileNotFoundError(_missing_data_message(
          name, manual_dir,
          FileNotFoundError(f"missing {', '.join(missing)} in {manual_dir}")))
  # A download directory per dataset: TFDS extracts manual files into
  # <download_dir>/extracted under their own names, and MNIST and
  # Fashion-MNIST ship files of the same names, so a shared directory hands
  # the second dataset prepared the first one's images.
  download_dir = Path(builder.data_dir).parents[1] / "downloads" / name
  # Processes sharing a data_dir (side-by-side sweep workers, parallel test
  # workers) prepare one at a time; the others then find it prepared.
  with _file_lock(download_dir.parent / f"{name}.lock"):
    try:
      builder.download_and_prepare(
          download_dir=str(download_dir),
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # TFDS raises many types for offline failures.
      raise FileNotFoundError(
          _missing_data_message(name, manual_dir, e)) from e


@contextlib.contextmanager
def _file_lock(path: Path):
  """An exclusive advisory lock on `path` across processes (POSIX); a
  no-op where fcntl or the directory is unavailable."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
  except (ImportError, OSError) as e:
    logging.info("preparing without a lock (%s)", e)
    yield
    return
  with handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _is_prepared(builder) -> bool:
  try:
    return bool(builder.info.splits) and Path(builder.data_dir).exists()
  except Exception:  # Mocked or half-written builders.
    return False


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split into memory, via an .npz cache beside the records."""
  cache = Path(builder.data_dir) / f"jaxreg-{split}.npz"
  # Only a really prepared dataset gets a cache (not a mocked one in tests).
  use_cache = _is_prepared(builder)
  if use_cache and cache.exists():
    with np.load(cache) as z:
      return z["images"], z["labels"]
  source = builder.as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  labels = np.asarray([e["label"] for e in examples], np.int32)
  if images.ndim == 3:  # Grayscale stored without a channel axis.
    images = images[..., None]
  if not use_cache:
    return images, labels
  try:
    # Written beside the prepared records: the cache dies with them. The
    # unique temporary name keeps parallel workers from clobbering it.
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    from jaxreg import results
    results.write_atomic(cache, buf.getvalue())
  except OSError as e:  # A read-only data_dir only loses the speed-up.
    logging.info("not caching %s: %s", cache, e)
  return images, labels


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, data_dir: str | None, manual_dir: str | None):
  import tensorflow_datasets as tfds
  cfg = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir))
  _prepare(_builder(cfg), name, manual_dir)
  # A fresh builder reads what was prepared, by this process or another.
  builder = _builder(cfg)
  train = _read_split(builder, "train")
  test = _read_split(builder, "test")
  label = builder.info.features["label"]
  names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) \
      else tuple(str(i) for i in range(int(train[1].max()) + 1))
  return train, test, names


def load(cfg: ml_collections.ConfigDict) -> Dataset:
  """Loads `cfg.name` through TFDS, preparing it first if needed.

  The validation split is a seeded random `val_fraction` of the training
  split; statistics come from what remains for training.
  """
  validate(cfg)
  (train_x, train_y), (test_x, test_y), names = _load_cached(
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
