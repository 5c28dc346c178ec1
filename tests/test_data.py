"""The data layer on real MNIST (from ../shared/datasets) and mocked CIFAR."""
import contextlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxreg import config, data
from jaxreg.data import catalog, loading, preparation


def _cfg(**kw):
  c = config.dataset_config()
  c.update(kw)
  return c


def test_mnist_prepared_offline_whole_splits(mnist_manual_dir):
  ds = data.load(_cfg(name="mnist"))
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10 and ds.class_names[3] == "3"
  # Every digit is present in roughly its published proportion.
  counts = np.bincount(ds.test_labels, minlength=10)
  assert counts.min() > 850 and counts.sum() == 10000
  assert not ds.has_val
  # Statistics on the [0, 1] scale from the training split (the well-known
  # MNIST values 0.1307 / 0.3081).
  np.testing.assert_allclose(ds.mean, [0.1307], atol=1e-4)
  np.testing.assert_allclose(ds.std, [0.3081], atol=1e-4)


def test_fashion_mnist_is_not_mnist(mnist_manual_dir):
  """MNIST and Fashion-MNIST ship files of the same names; each must be
  prepared from its own (the published training means differ: 0.1307 for
  digits, 0.2860 for clothes)."""
  fashion = data.load(_cfg(name="fashion_mnist"))
  digits = data.load(_cfg(name="mnist"))
  assert fashion.class_names[0] == "T-shirt/top"
  np.testing.assert_allclose(fashion.mean, [0.2860], atol=1e-4)
  np.testing.assert_allclose(fashion.std, [0.3530], atol=1e-4)
  assert not np.array_equal(fashion.test_images[:100], digits.test_images[:100])


def test_validation_split_is_seeded_disjoint_and_stats_from_train(mnist_manual_dir):
  a = data.load(_cfg(name="mnist", val_fraction=0.1, split_seed=3))
  b = data.load(_cfg(name="mnist", val_fraction=0.1, split_seed=3))
  c = data.load(_cfg(name="mnist", val_fraction=0.1, split_seed=4))
  assert len(a.val_labels) == 6000 and len(a.train_labels) == 54000
  np.testing.assert_array_equal(a.val_images, b.val_images)
  assert not np.array_equal(a.val_images, c.val_images)
  # Disjoint: no training image equals its validation counterpart by hash.
  train_hashes = {x.tobytes() for x in a.train_images[:20000]}
  dup = sum(x.tobytes() in train_hashes for x in a.val_images[:2000])
  assert dup <= 2  # MNIST has a handful of exact duplicate digits.
  scaled = a.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(a.mean, scaled.mean(), rtol=1e-6)
  np.testing.assert_allclose(a.std, scaled.std(), rtol=1e-6)


def test_subsets(mnist_manual_dir):
  ds = data.load(_cfg(name="mnist", train_size=1000, test_size=500))
  assert len(ds.train_labels) == 1000 and len(ds.test_labels) == 500


def test_missing_dataset_says_which_files_to_put_where(tmp_path):
  empty = tmp_path / "manual"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as e:
    data.load(_cfg(name="fashion_mnist", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(empty)))
  msg = str(e.value)
  assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
  assert str(empty) in msg


def test_with_network_tfds_downloads_as_before(tmp_path, monkeypatch):
  """When the probe finds the network, TFDS's own downloader runs (stopped
  here at its first request, as there is no internet to test it with)."""
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(preparation, "unreachable", lambda *a, **k: None)
  requested = []

  @contextlib.contextmanager
  def open_url(url, **unused_kwargs):
    requested.append(url)
    raise ConnectionError("stopped at the request")
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(downloader, "_open_url", open_url)
  monkeypatch.setenv("JAXREG_MANUAL_DIR", str(tmp_path))
  with pytest.raises(data.DatasetMissingError, match="stopped at the request"):
    data.load(_cfg(name="cifar10", data_dir=str(tmp_path / "tfds")))
  assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="unknown dataset 'minst'"):
    data.load(_cfg(name="minst", data_dir="/nonexistent"))


@pytest.mark.parametrize("bad", [dict(val_fraction=1.0), dict(val_fraction=-0.1),
                                 dict(train_size=-1)])
def test_bad_options_refused(bad):
  with pytest.raises(ValueError, match="config.dataset"):
    data.validate(_cfg(**bad))


def test_mocked_cifar10_shapes_and_classes(tmp_path):
  loading.load_splits.cache_clear()
  try:
    with tfds.testing.mock_data(num_examples=64):
      ds = data.load(_cfg(name="cifar10", data_dir=str(tmp_path),
                          val_fraction=0.25))
  finally:
    loading.load_splits.cache_clear()
  assert ds.train_images.shape == (48, 32, 32, 3)
  assert ds.val_images.shape == (16, 32, 32, 3)
  # The mock builder carries no label names file; ClassLabel gives "0".."9".
  assert ds.num_classes == 10 and len(ds.class_names) == 10
  assert ds.mean.shape == (3,)
  assert data.info(_cfg(name="cifar10")) == (ds.image_shape, ds.num_classes)


# --- data.info: shapes without reading data. -----------------------------------


def test_info_table_covers_every_tested_dataset():
  assert set(catalog.SHAPES) == set(data.OFFICIAL_FILES)


def test_info_matches_load(mnist_manual_dir):
  for name in ("mnist", "fashion_mnist"):
    ds = data.load(_cfg(name=name))
    assert data.info(_cfg(name=name)) == (ds.image_shape, ds.num_classes)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn_cropped"])
def test_info_matches_the_tfds_builders_features(name, tmp_path):
  builder = tfds.builder(name, data_dir=str(tmp_path))
  features = builder.info.features
  assert data.info(_cfg(name=name)) == (tuple(features["image"].shape),
                                        features["label"].num_classes)
  assert not list(tmp_path.rglob("*.array_record*"))  # Nothing prepared.


def test_info_reads_and_prepares_nothing(tmp_path, monkeypatch):
  def refuse(*unused_args, **unused_kwargs):
    raise AssertionError("info touched the data")

  monkeypatch.setattr(loading, "load_splits", refuse)
  monkeypatch.setattr(preparation, "builder", refuse)
  for name in catalog.SHAPES:
    shape, num_classes = data.info(_cfg(
        name=name, data_dir=str(tmp_path / "none"),
        manual_dir=str(tmp_path / "none")))
    assert len(shape) == 3 and num_classes >= 10
  assert not list(tmp_path.iterdir())


def test_info_of_other_tfds_datasets_from_their_features(tmp_path):
  assert data.info(_cfg(name="kmnist", data_dir=str(tmp_path))) == (
      (28, 28, 1), 10)
  assert not list(tmp_path.rglob("*.array_record*"))


def test_info_of_an_unknown_name_raises_what_load_raises():
  cfg = _cfg(name="minst", data_dir="/nonexistent")
  with pytest.raises(ValueError, match="unknown dataset 'minst'") as from_info:
    data.info(cfg)
  with pytest.raises(ValueError) as from_load:
    data.load(cfg)
  assert str(from_info.value) == str(from_load.value)
