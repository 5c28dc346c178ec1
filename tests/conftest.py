"""Test set-up: real data comes from ../shared/datasets, prepared once.

TFDS reads TFDS_DATA_DIR when it is imported, so the variables are set here,
before any test module imports jaxreg or tensorflow_datasets.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

os.environ.setdefault("JAXREG_MANUAL_DIR", str(SHARED_DATASETS))
# Prepared datasets persist between local runs; a clean clone starts fresh.
os.environ.setdefault("TFDS_DATA_DIR", str(ROOT / ".pytest_cache" / "tfds"))
os.environ.setdefault("JAXREG_COMPILATION_CACHE",
                      str(ROOT / ".pytest_cache" / "xla"))
# Quiet TensorFlow's start-up chatter during preparation.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# As launch.py does, before any test starts JAX's CPU backend: the tests run
# the settings users get (jaxreg/hostmem.py), and faster.
from jaxreg import hostmem  # pylint: disable=g-import-not-at-top,wrong-import-position

hostmem.tune()


@pytest.fixture(scope="session")
def mnist_manual_dir() -> str:
  path = Path(os.environ["JAXREG_MANUAL_DIR"]) / "mnist"
  if not (path / "train-images-idx3-ubyte.gz").exists():
    pytest.fail(f"the official MNIST files are expected in {path} "
                "(../shared/datasets beside the repository, or set "
                "JAXREG_MANUAL_DIR)")
  return str(path)
