"""A dataset on the devices: whole splits resident as uint8 arrays.

The data stage's last step. `place(ds, mesh, eval_batch_size)` copies the
host arrays of a data.Dataset to the devices of `mesh`, replicated (the
step gathers its batch by index and shards it over the mesh's "data"
axis), pads each evaluation split to whole evaluation batches, and keeps a
fixed probe batch for feature statistics. Nothing here knows the model.

Several JAX processes (runtime.py): `mesh` spans the devices of all of
them. Every process reads the same dataset and holds it whole on its own
devices (small datasets, by design); the step's batch, gathered by index
from the same permutation in every process, is sharded over the global
mesh, so each device computes only its share of it, and the global batch
and its order are those of one process with as many devices. `fetch`
brings a sharded result (evaluation predictions) to every process.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreg import data as data_lib

# Size of the fixed batch whose activations feature statistics are taken on.
FEATURE_PROBE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A dataset's splits on the devices of one mesh.

  Attributes:
    host: the data.Dataset the arrays came from (labels for metrics,
      statistics, class names).
    mesh: the run's 1-D device mesh (axis "data").
    replicated: sharding of whole arrays on every device.
    batch_sharding: sharding of a batch split over the "data" axis.
    train_images, train_labels: the training split, replicated.
    eval_sets: split name ("val", "test") -> (images, labels, true length),
      padded to whole evaluation batches; only splits with examples.
    eval_batch_size: examples per evaluation step, a multiple of the device
      count.
    probe_images: the first test (else validation) images, for feature
      statistics.
  """
  host: data_lib.Dataset
  mesh: Mesh
  replicated: NamedSharding
  batch_sharding: NamedSharding
  train_images: jax.Array
  train_labels: jax.Array
  eval_sets: dict
  eval_batch_size: int
  probe_images: jax.Array


def pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
  """`x` with zero rows appended up to a multiple of `multiple` rows."""
  pad = (-len(x)) % multiple
  if not pad:
    return x
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])


def fetch(tree):
  """`tree`'s arrays as numpy arrays in this process: jax.device_get, and
  for an array sharded over other processes' devices too, all of it (a
  collective then: every process calls it in the same order)."""
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                         or x.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)


def check_mesh(mesh: Mesh) -> None:
  """Every JAX process must own a device of `mesh`: one left out would
  hold no share of the arrays and could not run the steps."""
  owners = {d.process_index for d in mesh.devices.flat}
  missing = sorted(set(range(jax.process_count())) - owners)
  if missing:
    raise ValueError(
        f"the run's {mesh.devices.size} devices leave out JAX process(es) "
        f"{missing} of {jax.process_count()}; with several processes use "
        "config.train.num_devices=0 (all devices)")


def place(ds: data_lib.Dataset, mesh: Mesh,
          eval_batch_size: int) -> DeviceData:
  """Copies `ds` to the devices of `mesh` (see module docstring)."""
  check_mesh(mesh)
  n_dev = mesh.devices.size
  # Evaluation batches are sharded too: round up to the device count.
  ebs = -(-min(eval_batch_size, max(
      len(ds.test_labels), len(ds.val_labels), 1)) // n_dev) * n_dev
  repl = NamedSharding(mesh, P())
  put = lambda x: jax.device_put(x, repl)
  eval_sets = {}
  for split, (x, y) in {"val": (ds.val_images, ds.val_labels),
                        "test": (ds.test_images, ds.test_labels)}.items():
    if len(y):
      eval_sets[split] = (put(pad_to(x, ebs)), put(pad_to(y, ebs)), len(y))
  probe = ds.test_images if len(ds.test_labels) else ds.val_images
  return DeviceData(
      host=ds, mesh=mesh, replicated=repl,
      batch_sharding=NamedSharding(mesh, P("data")),
      train_images=put(ds.train_images), train_labels=put(ds.train_labels),
      eval_sets=eval_sets, eval_batch_size=ebs,
      probe_images=put(probe[:min(len(probe), FEATURE_PROBE_SIZE)]))
