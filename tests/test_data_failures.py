"""How the data layer fails: offline refusals, damaged files, leftovers.

Real TFDS code paths throughout: the network is blocked by pointing the one
probe at a closed 127.0.0.1 port, damaged files are real prepared MNIST files
(from ../shared/datasets) garbled or truncated in tmp dirs, and leftovers are
made with the temporary names the real writers use.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
import shutil
import socket
import tempfile

import numpy as np
import pytest

from jaxreg import config, data
from jaxreg.data import loading, preparation


def _cfg(**kw):
  c = config.dataset_config()
  c.update(kw)
  return c


@pytest.fixture
def offline(monkeypatch):
  """The network is unreachable: the probe connects to a bound 127.0.0.1
  port that is not listening (refused at once). Records the probed URLs."""
  closed = socket.socket()
  closed.bind(("127.0.0.1", 0))
  port = closed.getsockname()[1]
  probed = []

  def target(url):
    probed.append(url)
    return "127.0.0.1", port

  monkeypatch.setattr(preparation, "probe_target", target)
  yield probed
  closed.close()


@pytest.fixture(autouse=True)
def _fresh_loads():
  loading.load_splits.cache_clear()
  yield
  loading.load_splits.cache_clear()


@pytest.fixture(scope="session")
def prepared_mnist(mnist_manual_dir):
  """The version folder of MNIST prepared in the session's data dir (with its
  caches), and the arrays a healthy load gives."""
  ds = data.load(_cfg(name="mnist"))
  version_dir = Path(preparation.builder(_cfg(name="mnist")).data_dir)
  return version_dir, ds


def _copy_prepared(prepared_mnist, root: Path, caches=True) -> Path:
  src, _ = prepared_mnist
  dst = root / "mnist" / src.name
  shutil.copytree(src, dst)
  if not caches:
    for f in dst.glob("jaxreg-*"):
      f.unlink()
  return dst


def _assert_same(ds, ref):
  np.testing.assert_array_equal(ds.train_images, ref.train_images)
  np.testing.assert_array_equal(ds.train_labels, ref.train_labels)
  np.testing.assert_array_equal(ds.test_images, ref.test_images)
  np.testing.assert_array_equal(ds.test_labels, ref.test_labels)


def _garble(path: Path, at: float = 0.5, n: int = 64):
  raw = bytearray(path.read_bytes())
  i = int(len(raw) * at)
  raw[i:i + n] = bytes(b ^ 0x5A for b in raw[i:i + n])
  path.write_bytes(bytes(raw))


# --- Missing data, no network. ------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(data.OFFICIAL_FILES))
def test_offline_missing_dataset_refused_in_seconds_with_exact_folder(
    name, tmp_path, monkeypatch, offline):
  """$JAXREG_MANUAL_DIR lacks the dataset's folder and the network is
  unreachable: refused at once (not after TFDS's ten retries with backoff,
  over three minutes), naming the exact folder and files."""
  manual_root = tmp_path / "manual"
  manual_root.mkdir()
  monkeypatch.setenv("JAXREG_MANUAL_DIR", str(manual_root))
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(data.DatasetMissingError) as e:
    data.load(_cfg(name=name, data_dir=str(tfds_dir)))
  msg = str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  assert f"into {manual_root / name} (" in msg
  assert "$JAXREG" not in msg
  for f in data.OFFICIAL_FILES[name]:
    assert f in msg
  assert "--config.dataset.manual_dir=DIR" in msg
  assert "JAXREG_MANUAL_DIR=PARENT" in msg
  assert "no network" in msg and "127.0.0.1" in msg
  # TFDS got as far as its first download, and the probe was for that URL.
  assert len(offline) == 1 and offline[0].startswith("http")
  # Nothing half-made is left behind (TFDS's download folders included).
  assert not list(tfds_dir.rglob("*.tmp.*"))
  assert not list(tfds_dir.rglob("incomplete.*"))


@pytest.mark.timeout(10)
def test_offline_without_any_manual_setting_names_tfds_default_folder(
    tmp_path, monkeypatch, offline):
  monkeypatch.delenv("JAXREG_MANUAL_DIR", raising=False)
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(data.DatasetMissingError) as e:
    data.load(_cfg(name="cifar10", data_dir=str(tfds_dir)))
  msg = str(e.value)
  assert f"into {tfds_dir / 'downloads' / 'cifar10' / 'manual'} (" in msg
  assert "cifar-10-binary.tar.gz" in msg
  assert "--config.dataset.manual_dir=DIR" in msg and "JAXREG_MANUAL_DIR" in msg


# --- The npz cache. -------------------------------------------------------------


@pytest.mark.parametrize("damage,split", [("garbled", "train"),
                                         ("truncated", "test")])
def test_damaged_cache_is_rebuilt_from_the_records(
    damage, split, prepared_mnist, tmp_path, caplog, offline):
  """The cache is derived from the prepared records, so a damaged one is
  rebuilt from them (with a warning naming it), never an error."""
  version_dir = _copy_prepared(prepared_mnist, tmp_path)
  cache = version_dir / f"jaxreg-{split}.npz"
  if damage == "garbled":
    _garble(cache)
  else:
    cache.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])
  with caplog.at_level(logging.WARNING):
    ds = data.load(_cfg(name="mnist", data_dir=str(tmp_path)))
  _assert_same(ds, prepared_mnist[1])
  assert any(str(cache) in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records)
  # Rewritten, with a checksum that matches it again.
  meta = json.loads((version_dir / f"jaxreg-{split}.npz.json").read_text())
  assert meta["sha256"] == hashlib.sha256(cache.read_bytes()).hexdigest()
  loading.load_splits.cache_clear()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _assert_same(data.load(_cfg(name="mnist", data_dir=str(tmp_path))),
                 prepared_mnist[1])
  assert not any("damaged" in r.getMessage() for r in caplog.records)
  assert not offline  # The records sufficed: no download was considered.


def test_cache_is_checked_against_its_checksum_file(prepared_mnist, tmp_path):
  """A cache that is a valid zip of the wrong content (its checksum file says
  otherwise) is rebuilt, not used."""
  version_dir = _copy_prepared(prepared_mnist, tmp_path)
  cache = version_dir / "jaxreg-test.npz"
  images, labels = prepared_mnist[1].test_images, prepared_mnist[1].test_labels
  np.savez(cache, images=images[::-1], labels=labels[::-1])
  ds = data.load(_cfg(name="mnist", data_dir=str(tmp_path)))
  _assert_same(ds, prepared_mnist[1])


def test_cache_without_checksum_file_is_checked_and_adopted(
    prepared_mnist, tmp_path, caplog):
  """A cache from before checksum files (or from a run killed between the
  cache and its checksum file) is kept when its zip CRCs hold."""
  version_dir = _copy_prepared(prepared_mnist, tmp_path)
  meta = version_dir / "jaxreg-train.npz.json"
  meta.unlink()
  mtime = (version_dir / "jaxreg-train.npz").stat().st_mtime_ns
  with caplog.at_level(logging.WARNING):
    _assert_same(data.load(_cfg(name="mnist", data_dir=str(tmp_path))),
                 prepared_mnist[1])
  assert not any("damaged" in r.getMessage() for r in caplog.records)
  assert (version_dir / "jaxreg-train.npz").stat().st_mtime_ns == mtime
  assert json.loads(meta.read_text())["members"]["images.npy"][1] > 0


# --- The prepared array_record files. ------------------------------------------


def test_damaged_records_rebuilt_from_the_manual_files(
    prepared_mnist, tmp_path, mnist_manual_dir, caplog, offline):
  version_dir = _copy_prepared(prepared_mnist, tmp_path)
  for f in version_dir.glob("jaxreg-test.npz*"):
    f.unlink()  # So that the test split is read from its records.
  shard = next(version_dir.glob("mnist-test.array_record*"))
  _garble(shard)
  with caplog.at_level(logging.WARNING):
    ds = data.load(_cfg(name="mnist", data_dir=str(tmp_path),
                        manual_dir=mnist_manual_dir))
  _assert_same(ds, prepared_mnist[1])
  assert any(str(shard) in r.getMessage() for r in caplog.records)
  assert not offline
  assert not list((tmp_path / "mnist").glob("incomplete.*"))


@pytest.mark.timeout(60)
def test_damaged_records_without_sources_name_the_file_and_what_to_delete(
    prepared_mnist, tmp_path, monkeypatch, offline):
  manual_root = tmp_path / "manual"
  manual_root.mkdir()
  monkeypatch.setenv("JAXREG_MANUAL_DIR", str(manual_root))
  tfds_dir = tmp_path / "tfds"
  version_dir = _copy_prepared(prepared_mnist, tfds_dir, caches=False)
  shard = next(version_dir.glob("mnist-train.array_record*"))
  _garble(shard)
  with pytest.raises(data.DatasetCorruptError) as e:
    data.load(_cfg(name="mnist", data_dir=str(tfds_dir)))
  msg = str(e.value)
  assert isinstance(e.value, RuntimeError)
  assert str(shard) in msg and "damaged" in msg
  assert f"delete {version_dir} " in msg
  assert f"into {manual_root / 'mnist'} (" in msg
  assert "train-images-idx3-ubyte.gz" in msg
  # The damaged files are kept where the message says they are.
  assert shard.exists() and not list((tfds_dir / "mnist").glob("incomplete.*"))


# --- Leftovers of killed writers. ------------------------------------------------


def test_leftovers_of_killed_writers_removed_by_the_next_load(
    prepared_mnist, tmp_path):
  from tensorflow_datasets.core.utils import file_utils
  version_dir = _copy_prepared(prepared_mnist, tmp_path)
  # A run killed while writing the cache (results.write_atomic's mkstemp).
  fd, cache_tmp = tempfile.mkstemp(dir=version_dir, prefix=".jaxreg-train.npz.")
  os.write(fd, b"\0" * 1024)
  os.close(fd)
  fd, meta_tmp = tempfile.mkstemp(dir=version_dir,
                                  prefix=".jaxreg-train.npz.json.")
  os.close(fd)
  # A run killed during TFDS preparation (its incomplete_dir name), one
  # killed writing a shard, and one killed downloading and extracting.
  incomplete = Path(file_utils._get_incomplete_dir(str(version_dir)))
  (incomplete / "mnist-train.array_record-00000-of-00001").parent.mkdir()
  (incomplete / "mnist-train.array_record-00000-of-00001").write_bytes(b"x")
  shard_tmp = version_dir / ("incomplete." + "0" * 32 +
                             ".mnist-train.array_record-00000-of-00001")
  shard_tmp.write_bytes(b"x")
  downloads = tmp_path / "downloads" / "mnist"
  download_tmp = downloads / ("storage.googleapis.com_cvdf-datasets_mnist_"
                              "train-imagesABC.gz.tmp." + "a" * 32)
  download_tmp.mkdir(parents=True)
  (download_tmp / "train-images-idx3-ubyte.gz").write_bytes(b"x")
  extract_tmp = downloads / "extracted" / ("incomplete." + "b" * 32 +
                                           "_GZIP.train-images-idx3-ubyte.gz")
  extract_tmp.parent.mkdir()
  extract_tmp.write_bytes(b"x")
  keep = version_dir / "notes.txt"
  keep.write_text("mine")

  ds = data.load(_cfg(name="mnist", data_dir=str(tmp_path)))

  _assert_same(ds, prepared_mnist[1])
  for leftover in (cache_tmp, meta_tmp, incomplete, shard_tmp, download_tmp,
                   extract_tmp):
    assert not os.path.exists(leftover), leftover
  assert keep.exists()
  assert (version_dir / "jaxreg-train.npz").exists()
  assert (version_dir / "dataset_info.json").exists()
