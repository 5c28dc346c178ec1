"""Helpers shared by bench/overhead.py and bench/mnist_epoch.py.

A benchmark here times steady-state work (after compilation and a warm-up
pass), repeats it and reports the median, and prints the 1-minute load
average next to its numbers: on a shared machine a number taken under load
is not comparable with one taken on an idle machine.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from jaxreg import config as config_lib  # pylint: disable=g-import-not-at-top
from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top
from jaxreg import engine as engine_lib  # pylint: disable=g-import-not-at-top
from jaxreg import models  # pylint: disable=g-import-not-at-top
from jaxreg import norms  # pylint: disable=g-import-not-at-top
from jaxreg import steps as steps_lib  # pylint: disable=g-import-not-at-top
from jaxreg import train  # pylint: disable=g-import-not-at-top
from jaxreg import hostmem  # pylint: disable=g-import-not-at-top

# What launch.py does before JAX starts its backend (jaxreg/hostmem.py), so
# benchmarks time what users get; JAXREG_HOST_TUNING=0 leaves the defaults.
HOST_TUNING = hostmem.tune()


TORCH_INSTALL_HINT = ("PyTorch is not installed; it is only needed for "
                      "the comparison: pip install torch==2.13.0 (a CPU "
                      "build)")


def torch_available() -> bool:
  """Whether PyTorch imports (the PyTorch twins are optional)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def compiled_train_step(steps) -> dict:
  """A `steps.Steps`' train step compiled once (no scan) with a fresh state:
  {"train": the compiled step, "compile_s", "state", "rng", "perm",
  "images", "labels"}, what the step benches call it with."""
  state = steps.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  compiled, compile_s = steps.compile(state, rng, scan=False)
  d = steps.data
  return {"train": compiled.train, "compile_s": compile_s, "state": state,
          "rng": rng, "perm": steps.perm(jax.random.key(0)),
          "images": d.train_images, "labels": d.train_labels}


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
  """Median seconds of fn() (which blocks) over `repeats` calls, after
  `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return median(ts)


def load_avg() -> float:
  """The 1-minute load average."""
  return os.getloadavg()[0]


def wait_for_quiet(max_load: float, wait_s: float) -> float:
  """Waits (at most `wait_s`) for the 1-minute load to drop below
  `max_load`; returns the load it measured last."""
  deadline = time.time() + wait_s
  while load_avg() >= max_load and time.time() < deadline:
    time.sleep(5.0)
  return load_avg()


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str = "") -> None:
  """A plain-text table (Markdown pipes, so it pastes into a README)."""
  cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  if title:
    print(f"\n{title}")
  line = lambda r: "| " + " | ".join(
      c.rjust(w) if i else c.ljust(w)
      for i, (c, w) in enumerate(zip(r, widths))) + " |"
  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells[1:]:
    print(line(r))
  sys.stdout.flush()


def _fmt(c: Any) -> str:
  if isinstance(c, float):
    if abs(c) >= 100:
      return f"{c:,.0f}"
    if abs(c) >= 10:
      return f"{c:.1f}"
    return f"{c:.2f}"
  return str(c)


def environment() -> str:
  import platform
  return (f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
          f", python {platform.python_version()}; host settings {HOST_TUNING}")


def synthetic_dataset(image_shape: tuple[int, int, int], num_classes: int,
                      n_train: int, n_test: int = 256,
                      seed: int = 0) -> data_lib.Dataset:
  """Random uint8 images: speed does not depend on the pixels, and models
  without a downloaded dataset (CIFAR shapes) can be timed."""
  rs = np.random.RandomState(seed)
  img = lambda n: rs.randint(0, 256, (n,) + tuple(image_shape)).astype(np.uint8)
  lab = lambda n: rs.randint(0, num_classes, n).astype(np.int32)
  c = image_shape[-1]
  return data_lib.Dataset(
      name="synthetic", train_images=img(n_train), train_labels=lab(n_train),
      val_images=img(0), val_labels=lab(0), test_images=img(n_test),
      test_labels=lab(n_test), mean=np.full((c,), 0.5, np.float32),
      std=np.full((c,), 0.25, np.float32), num_classes=num_classes,
      class_names=tuple(str(i) for i in range(num_classes)))


def study_config(study: str, arg: str | None = None,
                 overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """configs/<study>.py's get_config(arg), then `overrides` ("key=value",
  values parsed as on the command line)."""
  module, _ = config_lib.load_config_file(str(ROOT / "configs" /
                                              f"{study}.py"))
  return with_overrides(module.get_config(arg), overrides)


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """`config` with dotted "key=value" overrides applied."""
  for kv in overrides:
    key, _, value = kv.partition("=")
    config = config_lib.apply_overrides(
        config, {key: config_lib.parse_value(value)})
  return config


# The ResNet benchmarks (resnet_epoch.py, profile_step.py, step_variants.py):
# name -> (config file, overrides). Fashion-MNIST's shape (28x28x1, the
# dataset these machines have), as issue 19's measurements; S4's feature
# quantiles are an evaluation-time extra, not part of the step.
RESNET_STUDIES = {
    "resnet14": ("norms", ["dataset.name=fashion_mnist",
                           "train.feature_layer=''"]),
    "resnet9": ("resnet9", ["dataset.name=fashion_mnist",
                            "train.batch_size=32"]),
    # S3 (configs/mnist.py) for the step-level comparisons.
    "s3": ("mnist", []),
}


def resnet_config(study: str, overrides: Sequence[str] = ()
                  ) -> ml_collections.ConfigDict:
  """A RESNET_STUDIES configuration with more `overrides`."""
  name, base = RESNET_STUDIES[study]
  return study_config(name, None, list(base) + list(overrides))


def mnist_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """configs/mnist.py: study S3's configuration."""
  return study_config("mnist", arg)


@norms.register("batch_autodiff", ("momentum", "epsilon"))
class AutodiffBatchNorm(nn.Module):
  """norm=batch as it was before its closed-form backward pass
  (norms.batch_norm_affine): the same forward formula, differentiated by
  JAX. A variant `model.norm=batch_autodiff` compares the two in one
  process (no virtual batches, as S4 and S5)."""
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,)))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,)))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if not train:
      return (x - ra_mean.value) * jnp.reciprocal(
          jnp.sqrt(ra_var.value + self.epsilon)) * scale + bias
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * \
        scale + bias


class BareLoop:
  """A hand-written jitted Flax loop: what a user writes without jaxreg.

  Same model, batch and data path as the trainer (uint8 images resident on
  the device, a permutation per epoch, the batch gathered and standardized
  inside the step, dropout from a key folded with the step), plain
  optax.sgd with momentum at a constant learning rate, and the mean loss
  fetched once per epoch. `rng_impl` and `compiler_options` are the
  trainer's resolved speed options (steps.speed_options) or JAX's defaults
  (None, {}).
  """

  def __init__(self, config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               rng_impl: str | None, compiler_options: dict):
    t = config.train
    self.batch_size = bs = t.batch_size
    self.steps_per_epoch = len(ds.train_labels) // bs
    self.model = model = models.build_model(config.model, ds.num_classes)
    self.tx = tx = optax.sgd(config.optimizer.lr, config.optimizer.momentum)
    self.images = jax.device_put(ds.train_images)
    self.labels = jax.device_put(ds.train_labels)
    self.n = len(ds.train_labels)
    self.shape = (1,) + ds.image_shape
    self.options = compiler_options
    mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)

    def step(state, images, labels, perm, i, key):
      params, batch_stats, opt_state = state
      idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
      x = (images[idx].astype(jnp.float32) / 255.0 - mean) / std
      y = labels[idx]
      dropout_key = steps_lib.step_key(jax.random.fold_in(key, i), rng_impl)

      def loss_fn(params):
        variables = {"params": params}
        if batch_stats:
          variables["batch_stats"] = batch_stats
        logits, updates = model.apply(
            variables, x, train=True, rngs={"dropout": dropout_key},
            mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.mean(), updates

      (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params)
      upd, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, upd)
      return (params, updates.get("batch_stats", batch_stats), opt_state), loss

    self._step = jax.jit(step, donate_argnums=(0,))
    self._perm = jax.jit(lambda key: jax.random.permutation(key, self.n))

  def init_state(self, seed: int = 0):
    variables = self.model.init(jax.random.key(seed),
                                jnp.zeros(self.shape, jnp.float32), train=False)
    params = variables["params"]
    return (params, variables.get("batch_stats", {}), self.tx.init(params))

  def compile(self, state, key) -> float:
    t0 = time.perf_counter()
    perm = self._perm(key)
    self._compiled = self._step.lower(
        state, self.images, self.labels, perm, np.int32(0), key).compile(
            compiler_options=self.options)
    return time.perf_counter() - t0

  def epoch(self, state, epoch: int, key):
    """One epoch; returns (state, mean loss), the loss fetched (a sync)."""
    perm = self._perm(jax.random.fold_in(key, epoch))
    losses = []
    for i in range(self.steps_per_epoch):
      state, loss = self._compiled(state, self.images, self.labels, perm,
                                   np.int32(i), key)
      losses.append(loss)
    return state, float(jnp.mean(jnp.stack(losses)))


class TrainerLoop:
  """The framework's own epoch: train.run_epoch over a one-member engine,
  then the engine's epoch totals (what train.run does each epoch, without
  its files)."""

  def __init__(self, config: ml_collections.ConfigDict, ds: data_lib.Dataset):
    self.engine = engine_lib.build(config, ds, steps_lib.make_mesh(1))
    self.epochs = config.train.epochs
    self.steps_per_epoch = self.engine.steps.steps_per_epoch
    self.batch_size = self.engine.steps.batch_size

  def init_state(self, seed: int = 0):
    # The train rng is the one time_epochs passes to compile().
    return self.engine.steps.init_state(jax.random.key(seed))

  def compile(self, state, key) -> float:
    self.engine.rngs = [key]
    return self.engine.compile([state])

  def epoch(self, state, epoch: int, key):
    del key  # The engine's train rng (set in compile).
    states, step_metrics, _ = train.run_epoch(self.engine, [state], epoch,
                                              self.epochs)
    totals = self.engine.epoch_totals(step_metrics, [True])[0]
    return states[0], totals["train_loss"]


def time_epochs(loops: dict[str, Any], repeats: int, *,
                between: Callable[[], None] | None = None
                ) -> tuple[dict[str, float], dict[str, float],
                           dict[str, list[float]], dict[str, list[int]]]:
  """Compiles each loop and times its first epoch, then runs `repeats`
  rounds in which every loop runs one epoch in turn (so all see the same
  load).

  Returns ({name: compile seconds}, {name: first-epoch seconds}, {name:
  [steady epoch seconds per round]}, {name: [the process's minor page faults
  in each steady epoch]}). Each epoch ends with the loss on the host, so the
  time is the device's.
  """
  key = jax.random.key(1)
  states, compile_s, first_s = {}, {}, {}
  for name, loop in loops.items():
    state = loop.init_state()
    compile_s[name] = loop.compile(state, key)
    if between is not None:
      between()
    t0 = time.perf_counter()
    states[name], _ = loop.epoch(state, 1, key)
    first_s[name] = time.perf_counter() - t0
  times = {name: [] for name in loops}
  faults = {name: [] for name in loops}
  for r in range(repeats):
    for name, loop in loops.items():
      if between is not None:
        between()
      f0 = _minor_faults()
      t0 = time.perf_counter()
      states[name], _ = loop.epoch(states[name], r + 2, key)
      times[name].append(time.perf_counter() - t0)
      faults[name].append(_minor_faults() - f0)
  return compile_s, first_s, times, faults


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
