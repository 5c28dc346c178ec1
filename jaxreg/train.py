"""The train loop: pure jitted steps over data resident on the devices.

`train_step(state, batch, rng)` and `eval_step(state, batch)` are module-level
pure functions. `train_and_evaluate(config, workdir)` wires config -> data ->
model -> optimizer -> steps and writes the run directory (see results.py).

Devices: one `jax.jit` over a 1-D `Mesh` named "data": the batch is sharded
over it and the state replicated, so BatchNorm sees the global batch (use
`config.model.norm_kwargs.virtual_batch_size` for a fixed statistics size).

Interruptions (see checkpoint.py): a run killed at any moment and relaunched
with the same command resumes from its latest checkpoint and ends with the
numbers of an uninterrupted run, bit for bit on CPU. That holds because
everything random is a function of (seed, epoch, global step): the epoch's
permutation is fold_in(fold_in(rng, 1), epoch) and each step folds the rng
with state.step. On GPU it needs XLA_FLAGS=--xla_gpu_deterministic_ops=true.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreg import augment as augment_lib
from jaxreg import checkpoint
from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import losses
from jaxreg import metrics as metrics_lib
from jaxreg import models
from jaxreg import optim
from jaxreg import results
from jaxreg import schedules


FEATURE_QUANTILES = (1, 20, 80, 99)
FEATURE_PROBE_SIZE = 512


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # {"params", "batch_stats"} weight average when config.train.ema_decay > 0
  # (optim.LookaheadEMA); None otherwise.
  ema: Any = None
  # models.DROPOUT_COLLECTION of this state's own dropout rates, set by
  # stacked.py when a group's members differ in dropout; None otherwise.
  dropout_keep: Any = None


class Diverged(RuntimeError):
  """The training loss became NaN or infinite."""


# --- Steps ------------------------------------------------------------------


def _standardize(images_u8: jax.Array, mean: jax.Array, std: jax.Array):
  return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def step_key(rng: jax.Array, impl: str | None) -> jax.Array:
  """A key of PRNG implementation `impl` drawn from `rng` (None: `rng`).

  The step's own randomness (dropout masks, augmentation) can come from a
  cheaper generator than the run's threefry2x32 keys: on CPU, JAX lowers
  threefry2x32 as a rolled loop that XLA does not fuse (dropout masks from
  it took about a fifth of the S3 step, bench/README.md), while
  threefry4x32 and philox4x32 are unrolled and fused. (philox4x32 does not
  compile for arrays sharded over several devices in jax 0.10.2: its
  `mulhi` has no sharding rule.) The new key is a pure function of `rng`,
  so a resumed run draws the same numbers.
  """
  if impl is None:
    return rng
  shape = jax.eval_shape(
      lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return jax.random.wrap_key_data(
      jax.random.bits(rng, shape, jnp.uint32), impl=impl)


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating leaves of `tree` cast to `dtype` (others untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype)
      if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *,
               augment_fn: Callable, num_classes: int, label_smoothing: float,
               mean: jax.Array, std: jax.Array,
               lookahead: optim.LookaheadEMA | None = None,
               rng_impl: str | None = None,
               compute_dtype: Any = None) -> tuple[TrainState, dict]:
  """One SGD step on `batch` = {"image": uint8 NHWC, "label": int32}.

  Augmentation runs here, on the device, from `rng` folded with the step so
  a resumed run draws exactly the randomness an uninterrupted one would.
  With `lookahead`, the weight average follows the update (see
  optim.LookaheadEMA). `rng_impl` names the PRNG dropout masks are drawn
  from (see `step_key`). With `compute_dtype` (e.g. bfloat16) the forward and backward
  passes run on parameters and images cast to it, while the parameters,
  the optimizer state, the norm statistics and the loss stay float32.
  """
  aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  # Only dropout draws from `rng_impl`: augmentation keeps the run's
  # threefry2x32 key. XLA:CPU (jax 0.10.2) compiles pad_crop's randint from a
  # fold_in of a converted threefry4x32 key into a fusion that never
  # finishes; augmentation draws are few, dropout masks are the cost.
  dropout_rng = step_key(dropout_rng, rng_impl)
  images = batch["image"].astype(jnp.float32) / 255.0
  labels = losses.one_hot(batch["label"], num_classes)
  images, labels = augment_fn(aug_rng, images, labels)
  images = (images - mean) / std
  if compute_dtype is not None:
    images = images.astype(compute_dtype)

  def loss_fn(params):
    if compute_dtype is not None:
      # The cast is differentiated: gradients arrive float32.
      params = cast_floats(params, compute_dtype)
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    if state.dropout_keep is not None:
      variables[models.DROPOUT_COLLECTION] = state.dropout_keep
    logits, updates = state.apply_fn(
        variables, images, train=True, rngs={"dropout": dropout_rng},
        mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    loss = losses.cross_entropy(logits, labels, label_smoothing).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  batch_stats = updates.get("batch_stats", state.batch_stats)
  if compute_dtype is not None:
    # Norm statistics stay in their own (float32) dtype.
    batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                               batch_stats, state.batch_stats)
  state = state.apply_gradients(grads=grads)
  state = state.replace(
      params=optim.project_params(state.params), batch_stats=batch_stats)
  if lookahead is not None:
    live, ema = lookahead(state.step, {"params": state.params,
                                       "batch_stats": state.batch_stats},
                          state.ema)
    state = state.replace(params=live["params"],
                          batch_stats=live["batch_stats"], ema=ema)
  correct = jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
  n = labels.shape[0]
  return state, {"loss_sum": loss * n, "correct": correct, "count": n}


TTA_MODES = ("", "flip", "flip_translate")


def tta_logits(apply_fn: Callable, variables: dict, images: jax.Array,
               tta: str = "") -> jax.Array:
  """Eval-mode logits, averaged over test-time views as airbench does.

  "": the images only. "flip": 1/2 each for the images and their mirror.
  "flip_translate" (airbench's TTA level 2): 1/4 each for the images and
  their mirror, 1/8 each for the images shifted one pixel down-right and
  up-left (reflect padding) and the mirrors of those. Logits, not
  probabilities, are averaged. All views go through one batched call.
  """
  if tta not in TTA_MODES:
    raise ValueError(f"config.train.tta={tta!r}; valid choices: "
                     f"{', '.join(map(repr, TTA_MODES))}")
  if not tta:
    return apply_fn(variables, images, train=False)
  views = [images, images[:, :, ::-1]]
  weights = [0.5, 0.5]
  if tta == "flip_translate":
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    for shifted in (padded[:, :h, :w], padded[:, 2:, 2:]):
      views += [shifted, shifted[:, :, ::-1]]
    weights = [0.25, 0.25] + [0.125] * 4
  logits = apply_fn(variables, jnp.concatenate(views), train=False)
  logits = logits.reshape((len(views), images.shape[0]) + logits.shape[1:])
  return jnp.tensordot(jnp.asarray(weights, logits.dtype), logits, axes=1)


def eval_step(state: TrainState, batch: dict, *, num_classes: int,
              mean: jax.Array, std: jax.Array, tta: str = "") -> dict:
  """Per-example predictions and losses; the caller masks padding.

  `tta` averages the logits over test-time views (see `tta_logits`).
  """
  images = _standardize(batch["image"], mean, std)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = tta_logits(state.apply_fn, variables, images, tta)
  labels = losses.one_hot(batch["label"], num_classes)
  return {"pred": jnp.argmax(logits, -1).astype(jnp.int32),
          "loss": losses.cross_entropy(logits, labels, 0.0)}


# --- Devices ----------------------------------------------------------------


def make_mesh(num_devices: int) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
          f"config.train.num_devices={num_devices} but only {len(devices)} "
          f"devices are present ({jax.default_backend()}); lower it or use 0 "
          "for all")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


# --- Speed options (bench/README.md has the measurements) --------------------

# Whether an epoch runs as one compiled lax.scan, per platform, when
# config.train.scan_epoch is None. Only measured platforms are listed; the
# others get the Python loop (bench/mnist_epoch.py --scan measures both).
SCAN_EPOCH_DEFAULT = {"cpu": False}

# XLA:CPU options for config.train.xla_cpu_tuning: XLA's own loop emitters
# for convolutions (Eigen) and YNNPACK for elementwise ops and reductions.
XLA_CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
        "LIBRARY_FUSION_TYPE_REDUCE"),
}

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
RNG_IMPLS = ("threefry4x32", "threefry2x32", "philox4x32")


def speed_options(t: ml_collections.ConfigDict, platform: str,
                  num_devices: int = 1) -> tuple[str | None, Any, bool, dict]:
  """(rng_impl, compute_dtype, scan_epoch, compiler options) of the
  `config.train` section `t` on `num_devices` devices of `platform`;
  refuses bad values."""
  if t.rng_impl not in RNG_IMPLS:
    raise ValueError(f"config.train.rng_impl={t.rng_impl!r}; valid choices: "
                     f"{', '.join(RNG_IMPLS)}")
  try:
    jax.random.key(0, impl=t.rng_impl)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"config.train.rng_impl={t.rng_impl!r} is not available in jax "
        f"{jax.__version__}; use 'threefry2x32'") from e
  if t.rng_impl == "philox4x32" and num_devices > 1:
    raise ValueError(
        "config.train.rng_impl='philox4x32' does not compile for a batch "
        f"sharded over {num_devices} devices (jax {jax.__version__}); use "
        "'threefry4x32'")
  if t.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"config.train.compute_dtype={t.compute_dtype!r}; valid choices: "
        f"{', '.join(COMPUTE_DTYPES)}")
  scan = t.scan_epoch
  if scan is None:
    scan = SCAN_EPOCH_DEFAULT.get(platform, False)
  options = dict(XLA_CPU_OPTIONS) if (
      platform == "cpu" and t.xla_cpu_tuning) else {}
  # Threefry is what the key already is: no conversion in the step.
  impl = None if t.rng_impl == "threefry2x32" else t.rng_impl
  return impl, COMPUTE_DTYPES[t.compute_dtype], bool(scan), options


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
  pad = (-len(x)) % multiple
  if not pad:
    return x
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])


# --- The run ----------------------------------------------------------------


class _Trainer:
  """Holds what one run compiles once: the model, steps and device data."""

  def __init__(self, config: ml_collections.ConfigDict, ds: data_lib.Dataset,
               mesh: Mesh):
    self.config, self.ds, self.mesh = config, ds, mesh
    t = config.train
    n_dev = mesh.devices.size
    if t.batch_size % n_dev:
      raise ValueError(
          f"config.train.batch_size={t.batch_size} is not divisible by the "
          f"{n_dev} devices of this run; change the batch size or "
          "config.train.num_devices")
    self.batch_size = t.batch_size
    self.steps_per_epoch = len(ds.train_labels) // t.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"config.train.batch_size={t.batch_size} exceeds the "
          f"{len(ds.train_labels)} training examples")
    # Evaluation batches are sharded too: round up to the device count.
    self.eval_batch_size = -(-min(t.eval_batch_size, max(
        len(ds.test_labels), len(ds.val_labels), 1)) // n_dev) * n_dev

    self.platform = mesh.devices.flat[0].platform
    (self.rng_impl, self.compute_dtype, self.scan_epoch,
     self.compiler_options) = speed_options(t, self.platform, n_dev)
    # XLA:CPU runs every host device's share of a step on one shared thread
    # pool; with several steps in flight, a device can wait in a collective
    # for a peer whose share is queued behind it, and XLA aborts after 40 s
    # (seen with 2 host devices and 128-step epochs). On CPU with several
    # devices, each step finishes before the next is dispatched.
    self.sync_steps = self.platform == "cpu" and n_dev > 1
    self.repl = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P("data"))
    self.model = models.build_model(config.model, ds.num_classes)
    self.tx = optim.make_optimizer(config.optimizer, self.steps_per_epoch,
                                   t.epochs)
    self.schedule = schedules.make_schedule(
        config.optimizer.schedule, config.optimizer.lr, self.steps_per_epoch,
        t.epochs)
    self.lookahead = optim.make_lookahead(t, self.steps_per_epoch)
    self.data_init_time_s = 0.0
    self.augment_fn = augment_lib.make_augment(
        config.augment, ds.image_shape, ds.num_classes)
    # Refuses e.g. more extra cutout images than the batch holds, now
    # rather than while tracing.
    augment_lib.output_batch_size(config.augment, t.batch_size)
    self.feature_layer = t.feature_layer
    if self.feature_layer:
      layers = models.feature_layers(self.model, (1,) + ds.image_shape)
      if self.feature_layer not in layers:
        raise ValueError(
            f"config.train.feature_layer={self.feature_layer!r} is not a "
            f"layer of {config.model.name}; valid choices: {', '.join(layers)}")
    mean = jnp.asarray(ds.mean)
    std = jnp.asarray(ds.std)

    put = lambda x: jax.device_put(x, self.repl)
    self.train_images = put(ds.train_images)
    self.train_labels = put(ds.train_labels)
    self.eval_sets = {}
    for split, (x, y) in {"val": (ds.val_images, ds.val_labels),
                          "test": (ds.test_images, ds.test_labels)}.items():
      if len(y):
        self.eval_sets[split] = (put(_pad_to(x, self.eval_batch_size)),
                                 put(_pad_to(y, self.eval_batch_size)), len(y))

    bs, data_sh = self.batch_size, self.data_sharding

    def train_batch(state, images, labels, perm, i, rng):
      idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
      batch = jax.lax.with_sharding_constraint(
          {"image": images[idx], "label": labels[idx]}, data_sh)
      return train_step(state, batch, rng, augment_fn=self.augment_fn,
                        num_classes=ds.num_classes,
                        label_smoothing=t.label_smoothing, mean=mean, std=std,
                        lookahead=self.lookahead, rng_impl=self.rng_impl,
                        compute_dtype=self.compute_dtype)

    spe = self.steps_per_epoch

    def train_scan(state, images, labels, perm, rng):
      # A whole epoch as one program (config.train.scan_epoch).
      return jax.lax.scan(
          lambda s, i: train_batch(s, images, labels, perm, i, rng), state,
          jnp.arange(spe, dtype=jnp.int32))

    ebs = self.eval_batch_size

    def eval_batch(state, images, labels, i):
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * ebs, ebs)
      batch = jax.lax.with_sharding_constraint(
          {"image": sl(images), "label": sl(labels)}, data_sh)
      return eval_step(state, batch, num_classes=ds.num_classes, mean=mean,
                       std=std, tta=t.tta)

    # S4's feature analysis: quantiles of one layer's activations on a
    # fixed batch (the first test or validation images), every epoch.
    probe_split = "test" if len(ds.test_labels) else "val"
    probe = {"test": ds.test_images, "val": ds.val_images}[probe_split]
    self.probe_images = put(probe[:min(len(probe), FEATURE_PROBE_SIZE)])

    def feature_quantiles(state, images):
      variables = {"params": state.params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      x = models.capture_features(self.model, variables,
                                  _standardize(images, mean, std),
                                  self.feature_layer)
      return jnp.percentile(x.astype(jnp.float32), jnp.asarray(
          FEATURE_QUANTILES, jnp.float32))

    self._feature_quantiles = jax.jit(feature_quantiles)
    self._train_batch = jax.jit(train_batch, donate_argnums=(0,))
    self._train_scan = jax.jit(train_scan, donate_argnums=(0,))
    self._eval_batch = jax.jit(eval_batch)
    self._perm = jax.jit(
        lambda key: jax.random.permutation(key, len(ds.train_labels)),
        out_shardings=self.repl)

  def init_state(self, rng: jax.Array) -> TrainState:
    shape = (1,) + self.ds.image_shape

    def init(rng):
      # Eval mode: initial running statistics must not see the dummy input.
      variables = self.model.init({"params": rng, "dropout": rng},
                                  jnp.zeros(shape, jnp.float32), train=False)
      state = TrainState.create(
          apply_fn=self.model.apply, params=variables["params"], tx=self.tx,
          batch_stats=variables.get("batch_stats", {}))
      if self.lookahead is not None:
        # Zeros: the first averaging step replaces them (rho = 0).
        state = state.replace(ema=jax.tree.map(jnp.zeros_like, {
            "params": state.params, "batch_stats": state.batch_stats}))
      return state

    state = jax.jit(init, out_shardings=self.repl)(rng)
    if hasattr(self.model, "data_init"):
      # E.g. airbench's whitening conv, from the training images (host
      # NumPy; timed, since airbench counts it in its training time).
      t0 = time.perf_counter()
      params = self.model.data_init(jax.device_get(state.params),
                                    self.ds.train_images, self.ds.mean,
                                    self.ds.std)
      state = state.replace(params=jax.device_put(params, self.repl))
      jax.block_until_ready(state.params)
      self.data_init_time_s = time.perf_counter() - t0
    return state

  def compile(self, state: TrainState, rng: jax.Array) -> float:
    """Compiles both steps ahead of time; returns the seconds it took."""
    t0 = time.perf_counter()
    opts = self.compiler_options
    perm = self._perm(jax.random.key(0))
    # The single step is compiled in scan mode too: a resumed epoch that
    # starts mid-way (and stacked.py's loop engine) runs it.
    self._train_compiled = self._train_batch.lower(
        state, self.train_images, self.train_labels, perm, np.int32(0),
        rng).compile(compiler_options=opts)
    if self.scan_epoch:
      self._scan_compiled = self._train_scan.lower(
          state, self.train_images, self.train_labels, perm,
          rng).compile(compiler_options=opts)
    self._eval_compiled = {}
    for split, (x, y, _) in self.eval_sets.items():
      self._eval_compiled[split] = self._eval_batch.lower(
          state, x, y, np.int32(0)).compile(compiler_options=opts)
    if self.feature_layer:
      self._features_compiled = self._feature_quantiles.lower(
          state, self.probe_images).compile(compiler_options=opts)
    return time.perf_counter() - t0

  def features(self, state: TrainState) -> dict | None:
    """{"layer", "q01", "q20", "q80", "q99"} of the chosen layer, or None."""
    if not self.feature_layer:
      return None
    q = jax.device_get(self._features_compiled(state, self.probe_images))
    return {"layer": self.feature_layer,
            **{f"q{p:02d}": float(v) for p, v in zip(FEATURE_QUANTILES, q)}}

  def train_epoch(self, state: TrainState, epoch: int, rng: jax.Array,
                  log: Callable[[int, int], None] | None = None, *,
                  start: int = 0, step_metrics: Sequence[dict] = (),
                  should_stop: Callable[[int], Any] | None = None
                  ) -> tuple[TrainState, list[dict], int]:
    """Runs steps `start`, `start + 1`, ... of `epoch`.

    Returns (state, per-step metrics of the epoch so far, steps done). Fewer
    than `steps_per_epoch` steps are done when `should_stop(global step)`
    is true before one. `step_metrics` are those of the steps before
    `start` (from a checkpoint), so a resumed epoch sums the same numbers in
    the same order as an uninterrupted one.

    With `scan_epoch`, a whole epoch is one call (no progress lines, and a
    stop request waits for the epoch's end); a resumed epoch that starts
    mid-way runs its remaining steps one by one.
    """
    perm = self._perm(jax.random.fold_in(jax.random.fold_in(rng, 1), epoch))
    step_metrics = list(step_metrics)
    first = (epoch - 1) * self.steps_per_epoch
    if self.scan_epoch and start == 0:
      if should_stop is not None and should_stop(first):
        return state, step_metrics, 0
      state, m = self._scan_compiled(state, self.train_images,
                                     self.train_labels, perm, rng)
      return state, [m], self.steps_per_epoch
    last_log = time.perf_counter()
    for i in range(start, self.steps_per_epoch):
      if should_stop is not None and should_stop(first + i):
        return state, step_metrics, i
      state, m = self._train_compiled(state, self.train_images,
                                      self.train_labels, perm, np.int32(i), rng)
      step_metrics.append(m)
      if self.sync_steps:
        jax.block_until_ready(state)
      if log is not None and time.perf_counter() - last_log > \
          self.config.train.log_every_s > 0:
        jax.block_until_ready(m)
        log(i + 1, self.steps_per_epoch)
        last_log = time.perf_counter()
    return state, step_metrics, self.steps_per_epoch

  @staticmethod
  def epoch_totals(step_metrics: Sequence[dict]) -> dict:
    """Loss and accuracy over the epoch from per-step metrics (or, from a
    scanned epoch, metrics stacked over steps): one sum over all steps."""
    totals = jax.device_get(jax.tree.map(
        lambda *x: jnp.sum(jnp.concatenate([jnp.ravel(v) for v in x])),
        *step_metrics))
    return {"train_loss": float(totals["loss_sum"] / totals["count"]),
            "train_accuracy": float(totals["correct"] / totals["count"])}

  def evaluate(self, state: TrainState, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and losses for every example of `split`, padding dropped."""
    x, y, n = self.eval_sets[split]
    outs = [self._eval_compiled[split](state, x, y, np.int32(i))
            for i in range(len(y) // self.eval_batch_size)]
    outs = jax.device_get(outs)
    preds = np.concatenate([o["pred"] for o in outs])[:n]
    loss = np.concatenate([o["loss"] for o in outs])[:n]
    return preds, loss

  def eval_metrics(self, state: TrainState) -> tuple[dict, dict]:
    """Flat per-split metrics for metrics.jsonl, and the full ones."""
    flat, full = {}, {}
    labels = {"val": self.ds.val_labels, "test": self.ds.test_labels}
    for split in self.eval_sets:
      preds, loss = self.evaluate(state, split)
      m = metrics_lib.classification_metrics(
          labels[split], preds, self.ds.num_classes, losses=loss)
      m["preds"] = preds
      full[split] = m
      for k in ("loss", "accuracy", "micro_f1", "macro_f1"):
        flat[f"{split}_{k}"] = float(m[k])
    return flat, full


def _format_progress(epoch: int, epochs: int, row: dict, eta_s: float) -> str:
  parts = [f"epoch {epoch}/{epochs}",
           f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"]
  for split in ("val", "test"):
    if f"{split}_loss" in row:
      parts.append(f"{split} loss {row[f'{split}_loss']:.4f} "
                   f"acc {100 * row[f'{split}_accuracy']:.2f}%")
  parts.append(f"{row['epoch_time_s']:.1f}s ({row['images_per_s']:.0f} img/s)")
  parts.append(f"ETA {eta_s:.0f}s")
  return " | ".join(parts)


# Statuses of a run that is over: relaunching returns its summary as it is
# (training is deterministic, so a diverged run would only diverge again).
FINAL_STATUSES = ("completed", "diverged")
CHECKPOINT_DIR = "checkpoints"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       *, variant: str | None = None,
                       overrides: dict | None = None) -> dict:
  """Trains one configuration and writes its run directory.

  Returns the summary (also written to `workdir/summary.json`). A failure is
  recorded there with status "failed" and re-raised; a NaN/inf loss stops the
  run with status "diverged" and returns normally.

  Resuming is automatic: on a run directory holding checkpoints, training
  continues from the latest intact one and ends with the numbers of an
  uninterrupted run; a completed or diverged run is returned as it is. In
  both cases `config` must equal the saved config.json up to
  results.NON_SEMANTIC_KEYS, else results.ConfigMismatch (a ValueError
  naming the keys) is raised before any file is touched.

  SIGTERM or SIGINT finishes the current step, saves a checkpoint there
  (inside the epoch if need be), leaves status "running" and raises
  checkpoint.Interrupted: a SystemExit with code 143 (SIGTERM) or 130
  (SIGINT). The previous signal handlers are restored on return.
  """
  workdir = Path(workdir)
  prior = _check_prior_run(config, workdir)
  if prior is not None and prior.get("status") in FINAL_STATUSES:
    logging.info("%s: already %s, not retrained", workdir, prior["status"])
    return prior
  workdir.mkdir(parents=True, exist_ok=True)
  summary: dict[str, Any] = {
      "status": "running", "variant": variant, "overrides": overrides or {},
      "dataset": config.dataset.name, "model": config.model.name,
      "norm": config.model.norm, "seed": config.seed,
      "target_accuracy": config.target_accuracy, "epochs_completed": 0,
  }
  results.write_json(workdir / "config.json", config.to_dict())
  results.write_json(workdir / "env.json", results.environment())
  results.write_json(workdir / "summary.json", summary)
  history: list[dict] = []
  try:
    config_lib.validate(config)
    checkpoint.validate(config)
    with checkpoint.StopSignals() as stop:
      _run(config, workdir, summary, history, stop)
  except Diverged as e:
    summary.update(status="diverged", error=str(e))
    logging.warning("%s: %s", workdir, e)
  except (KeyboardInterrupt, SystemExit) as e:
    # Stopped, not failed: status stays "running" and a relaunch resumes
    # from the last checkpoint (with checkpoint.Interrupted, the one just
    # saved).
    results.write_json(workdir / "summary.json", summary)
    if isinstance(e, checkpoint.Interrupted):
      logging.warning("%s: %s", workdir, e)
    raise
  except BaseException as e:
    summary.update(status="failed", error=f"{type(e).__name__}: {e}")
    results.write_json(workdir / "summary.json", summary)
    raise
  results.write_json(workdir / "summary.json", summary)
  return summary


def _check_prior_run(config: ml_collections.ConfigDict,
                     workdir: Path) -> dict | None:
  """The summary of a run `workdir` already holds (checkpoints or a final
  status), after making sure it is a run of `config`; None if it holds none.
  """
  try:
    prior = results.read_json(workdir / "summary.json")
  except (OSError, ValueError):
    prior = None
  finished = (prior or {}).get("status") in FINAL_STATUSES
  if finished:
    what = f"a {prior['status']} run"
  elif checkpoint.has_checkpoints(workdir / CHECKPOINT_DIR):
    what = "checkpoints"
  else:
    return None  # Nothing worth keeping: a fresh start overwrites it.
  results.check_same_config(workdir, config.to_dict(), what)
  return prior


def _run(config: ml_collections.ConfigDict, workdir: Path, summary: dict,
         history: list[dict], stop: checkpoint.StopSignals) -> None:
  t = config.train
  ds = data_lib.load(config.dataset)
  mesh = make_mesh(t.num_devices)
  trainer = _Trainer(config, ds, mesh)
  spe = trainer.steps_per_epoch
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  state = trainer.init_state(init_rng)
  summary["num_params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  if trainer.data_init_time_s:
    summary["data_init_time_s"] = trainer.data_init_time_s
  summary["num_devices"] = int(mesh.devices.size)
  compile_time = trainer.compile(state, train_rng)

  with checkpoint.RunCheckpoints(workdir / CHECKPOINT_DIR,
                                 config.checkpoint) as ckpts:
    pos = checkpoint.Position(history=history)
    restored = ckpts.restore_latest(state)
    if restored is not None:
      state, meta = restored
      pos = checkpoint.Position.from_meta(meta)
      history[:] = pos.history
      pos.history = history
      summary["resumed_from_step"] = meta["step"]
      logging.info("%s: resuming from step %d (epoch %d, step %d/%d)",
                   workdir, meta["step"], pos.epoch, pos.step_in_epoch, spe)
    # Rows of epochs after the checkpoint (or of an earlier attempt that
    # left none) will be computed again.
    results.write_jsonl(workdir / "metrics.jsonl", history)
    pos.sessions += 1
    pos.compile_time_s += compile_time
    summary.update(compile_time_s=pos.compile_time_s, sessions=pos.sessions,
                   epochs_completed=pos.epoch - 1)
    results.write_json(workdir / "summary.json", summary)
    logging.info("%s: %s/%s norm=%s, %d params, %d devices, %d steps/epoch, "
                 "compiled in %.1fs", workdir, config.dataset.name,
                 config.model.name, config.model.norm, summary["num_params"],
                 mesh.devices.size, spe, compile_time)

    images_per_epoch = spe * trainer.batch_size
    full = {}
    while pos.epoch <= t.epochs:
      epoch, start = pos.epoch, pos.step_in_epoch
      t0 = time.perf_counter()

      def log_within(i, n, epoch=epoch, t0=t0, start=start):
        logging.info("epoch %d/%d: step %d/%d (%.0f img/s)", epoch, t.epochs,
                     i, n, (i - start) * trainer.batch_size /
                     (time.perf_counter() - t0))

      state, step_metrics, done = trainer.train_epoch(
          state, epoch, train_rng, log_within, start=start,
          step_metrics=pos.step_metrics, should_stop=stop.requested)
      if done < spe:  # A stop was requested before step `done`.
        jax.block_until_ready(state)
        pos.step_in_epoch, pos.step_metrics = done, step_metrics
        pos.epoch_time_s += time.perf_counter() - t0
        step = (epoch - 1) * spe + done
        if step > 0 and step not in ckpts.steps:
          ckpts.save(step, state, pos.to_meta())
        raise checkpoint.Interrupted(stop.signum, step)
      row = trainer.epoch_totals(step_metrics)
      epoch_time = pos.epoch_time_s + time.perf_counter() - t0
      if not math.isfinite(row["train_loss"]):
        summary["epochs_completed"] = epoch - 1
        raise Diverged(f"training loss became {row['train_loss']} in epoch "
                       f"{epoch}")
      row = {"epoch": epoch, "step": epoch * spe,
             "lr": float(trainer.schedule(epoch * spe - 1)), **row}
      if epoch % t.eval_every == 0 or epoch == t.epochs:
        t_eval = time.perf_counter()
        flat, full = trainer.eval_metrics(state)
        row.update(flat, eval_time_s=time.perf_counter() - t_eval)
      features = trainer.features(state)
      if features is not None:
        row["features"] = features
      train_time = pos.train_time_s + epoch_time
      row.update(epoch_time_s=epoch_time, train_time_s=train_time,
                 images_per_s=images_per_epoch / epoch_time)
      history.append(row)
      results.write_jsonl(workdir / "metrics.jsonl", history)
      pos = dataclasses.replace(pos, epoch=epoch + 1, step_in_epoch=0,
                                train_time_s=train_time, epoch_time_s=0.0,
                                step_metrics=[])
      summary["epochs_completed"] = epoch
      if checkpoint.should_save(epoch, t.epochs, config.checkpoint.every_epochs):
        ckpts.save(epoch * spe, state, pos.to_meta(),
                   val_accuracy=row.get("val_accuracy"))
      eta = (t.epochs - epoch) * train_time / epoch
      logging.info("%s", _format_progress(epoch, t.epochs, row, eta))

  if not full:  # Resumed from the final checkpoint: evaluate it again.
    _, full = trainer.eval_metrics(state)
  finish_summary(config, ds, workdir, summary, history, full,
                 pos.train_time_s, images_per_epoch)


def finish_summary(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                   run_dir: Path, summary: dict, history: list[dict],
                   full: dict, train_time: float,
                   images_per_epoch: int) -> None:
  """Fills a completed run's `summary` (final metrics per split, time to
  target) and writes its misclassified.npz; shared by single runs and
  stacked members."""
  last = history[-1]
  summary.update(
      status="completed",
      train_loss=last["train_loss"], train_accuracy=last["train_accuracy"],
      train_time_s=train_time,
      images_per_s=images_per_epoch * len(history) / train_time)
  for split, m in full.items():
    for k in ("loss", "accuracy", "micro_f1", "macro_f1"):
      summary[f"{split}_{k}"] = float(m[k])
    summary[f"{split}_per_class_accuracy"] = m["per_class_accuracy"]
    summary[f"{split}_confusion"] = m["confusion"]
  if config.target_accuracy is not None:
    tta_s, tta_epochs = metrics_lib.time_to_target(history,
                                                   config.target_accuracy)
    summary.update(time_to_target_s=tta_s, epochs_to_target=tta_epochs)
  if "test" in full:
    _save_misclassified(run_dir / "misclassified.npz", ds,
                        full["test"]["preds"])


def _save_misclassified(path: Path, ds: data_lib.Dataset, preds: np.ndarray,
                        n: int = 10) -> None:
  wrong = np.flatnonzero(preds != ds.test_labels)[:n]
  import io
  buf = io.BytesIO()
  np.savez_compressed(buf, images=ds.test_images[wrong],
                      labels=ds.test_labels[wrong], preds=preds[wrong],
                      class_names=np.asarray(ds.class_names))
  results.write_atomic(path, buf.getvalue())
