"""The compiled step functions of a run, built from (config, data, mesh).

`train_step(state, batch, rng)` and `eval_step(state, batch)` are
module-level pure functions. `Steps(config, data, mesh)` builds what they
close over (model, optimizer chain, augmentation, weight average) and the
batch-level functions a run calls: a train step that gathers its batch from
the device-resident data by index, a whole epoch as one `lax.scan`, an
evaluation step, feature quantiles and the epoch's permutation. `compile`
compiles them ahead of time for one member, or `jax.vmap`ped over a stack of
members, always with the same compiler options. No loop and no files here:
train.py runs the loop.

Devices: one `jax.jit` over a 1-D `Mesh` named "data": the batch is sharded
over it and the state replicated, so BatchNorm sees the global batch (use
`config.model.norm_kwargs.virtual_batch_size` for a fixed statistics size).
Everything random is a function of (seed, epoch, global step): the epoch's
permutation is fold_in(fold_in(rng, 1), epoch) and each step folds the rng
with state.step, so a resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state
from jax.sharding import Mesh

from jaxreg import augment as augment_lib
from jaxreg import device_data
from jaxreg import losses
from jaxreg import models
from jaxreg import optim
from jaxreg import validation

FEATURE_QUANTILES = (1, 20, 80, 99)


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # {"params", "batch_stats"} weight average when config.train.ema_decay > 0
  # (optim.LookaheadEMA); None otherwise.
  ema: Any = None
  # models.DROPOUT_COLLECTION of this state's own dropout rates, set for
  # the members of a stacked group that differ in dropout; None otherwise.
  dropout_keep: Any = None


# --- Pure steps ---------------------------------------------------------------


def standardize(images_u8: jax.Array, mean: jax.Array, std: jax.Array):
  """uint8 images -> float32, standardized with the dataset's statistics."""
  return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def step_key(rng: jax.Array, impl: str | None) -> jax.Array:
  """A key of PRNG implementation `impl` drawn from `rng` (None: `rng`).

  The step's own randomness (dropout masks) can come from a cheaper
  generator than the run's threefry2x32 keys: on CPU, JAX lowers
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


def _variables(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


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
  from (see `step_key`). With `compute_dtype` (e.g. bfloat16) the forward
  and backward passes run on parameters and images cast to it, while the
  parameters, the optimizer state, the norm statistics and the loss stay
  float32.
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


def eval_step(state: TrainState, batch: dict, *, num_classes: int,
              mean: jax.Array, std: jax.Array, tta: str = "") -> dict:
  """Per-example predictions and losses; the caller masks padding.

  `tta` averages the logits over test-time views (augment.tta_logits).
  """
  images = standardize(batch["image"], mean, std)
  logits = augment_lib.tta_logits(state.apply_fn, _variables(state), images,
                                  tta)
  labels = losses.one_hot(batch["label"], num_classes)
  return {"pred": jnp.argmax(logits, -1).astype(jnp.int32),
          "loss": losses.cross_entropy(logits, labels, 0.0)}


# --- Devices and speed options (bench/README.md has the measurements) ---------


def make_mesh(num_devices: int) -> Mesh:
  """A 1-D mesh ("data") over the first `num_devices` devices (0: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
          f"config.train.num_devices={num_devices} but only {len(devices)} "
          f"devices are present ({jax.default_backend()}); lower it or use 0 "
          "for all")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


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


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
  """How a run's steps are compiled and driven on its platform."""
  rng_impl: str | None  # Dropout PRNG; None: the run's own threefry2x32.
  compute_dtype: Any  # None: float32.
  scan_epoch: bool
  compiler_options: dict
  # XLA:CPU runs every host device's share of a step on one shared thread
  # pool; with several steps in flight, a device can wait in a collective
  # for a peer whose share is queued behind it, and XLA aborts after 40 s
  # (seen with 2 host devices and 128-step epochs). On CPU with several
  # devices, each step finishes before the next is dispatched.
  sync_steps: bool


def speed_options(t: ml_collections.ConfigDict, platform: str,
                  num_devices: int = 1) -> SpeedOptions:
  """The SpeedOptions of the `config.train` section `t` on `num_devices`
  devices of `platform`; refuses bad values."""
  validation.check_speed_options(t, num_devices)
  scan = t.scan_epoch
  if scan is None:
    scan = SCAN_EPOCH_DEFAULT.get(platform, False)
  options = dict(XLA_CPU_OPTIONS) if (
      platform == "cpu" and t.xla_cpu_tuning) else {}
  # Threefry is what the key already is: no conversion in the step.
  impl = None if t.rng_impl == "threefry2x32" else t.rng_impl
  return SpeedOptions(
      rng_impl=impl, compute_dtype=validation.COMPUTE_DTYPES[t.compute_dtype],
      scan_epoch=bool(scan), compiler_options=options,
      sync_steps=platform == "cpu" and num_devices > 1)


# --- The step functions of one run -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
  """Ahead-of-time compiled functions (for one member, or vmapped)."""
  train: Callable  # (state, images, labels, perm, i, rng) -> (state, m)
  scan: Callable | None  # (state, images, labels, perm, rng) -> (state, m)
  eval: dict  # split -> (state, images, labels, i) -> {"pred", "loss"}
  features: Callable | None  # (state, probe images) -> quantiles
  compiler_options: dict


# in_axes of the vmapped functions: state, permutation and rng per member;
# images, labels and the step index shared.
_TRAIN_AXES = (0, None, None, 0, None, 0)
_SCAN_AXES = (0, None, None, 0, 0)
_EVAL_AXES = (0, None, None, None)
_FEATURE_AXES = (0, None)


class Steps:
  """The model, optimizer and batch-level step functions of one config.

  Attributes:
    config, data, mesh: what they were built from.
    model, tx, lookahead, augment_fn: the stages, resolved once.
    batch_size, steps_per_epoch: of the training split.
    speed: the platform's SpeedOptions.
    feature_layer: the layer whose quantiles are tracked, or None.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               data: device_data.DeviceData, mesh: Mesh):
    self.config, self.data, self.mesh = config, data, mesh
    t = config.train
    ds = data.host
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
    self.platform = mesh.devices.flat[0].platform
    self.speed = speed_options(t, self.platform, n_dev)
    self.model = models.build_model(config.model, ds.num_classes)
    self.tx = optim.make_optimizer(config.optimizer, self.steps_per_epoch,
                                   t.epochs)
    self.lookahead = optim.make_lookahead(t, self.steps_per_epoch)
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
    self._mean = jnp.asarray(ds.mean)
    self._std = jnp.asarray(ds.std)
    self.perm = jax.jit(
        lambda key: jax.random.permutation(key, len(ds.train_labels)),
        out_shardings=data.replicated)
    self._init_jit = jax.jit(self.init, out_shardings=data.replicated)

  @property
  def has_data_init(self) -> bool:
    """Whether the model initialises parameters from the training data."""
    return hasattr(self.model, "data_init")

  # The pure functions (jitted, or vmapped then jitted, by `compile`).

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh state from `rng` (pure; `init_state` runs it)."""
    shape = (1,) + self.data.host.image_shape
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

  def train_batch(self, state, images, labels, perm, i, rng):
    """Step `i` of the epoch whose permutation is `perm`."""
    bs = self.batch_size
    idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
    batch = jax.lax.with_sharding_constraint(
        {"image": images[idx], "label": labels[idx]},
        self.data.batch_sharding)
    t = self.config.train
    return train_step(state, batch, rng, augment_fn=self.augment_fn,
                      num_classes=self.data.host.num_classes,
                      label_smoothing=t.label_smoothing, mean=self._mean,
                      std=self._std, lookahead=self.lookahead,
                      rng_impl=self.speed.rng_impl,
                      compute_dtype=self.speed.compute_dtype)

  def train_scan(self, state, images, labels, perm, rng):
    """A whole epoch as one program (config.train.scan_epoch)."""
    return jax.lax.scan(
        lambda s, i: self.train_batch(s, images, labels, perm, i, rng), state,
        jnp.arange(self.steps_per_epoch, dtype=jnp.int32))

  def eval_batch(self, state, images, labels, i):
    """Evaluation batch `i` of a padded split."""
    ebs = self.data.eval_batch_size
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * ebs, ebs)
    batch = jax.lax.with_sharding_constraint(
        {"image": sl(images), "label": sl(labels)}, self.data.batch_sharding)
    return eval_step(state, batch, num_classes=self.data.host.num_classes,
                     mean=self._mean, std=self._std,
                     tta=self.config.train.tta)

  def feature_quantiles(self, state, images):
    """S4's feature analysis: FEATURE_QUANTILES of one layer's activations."""
    x = models.capture_features(self.model, _variables(state),
                                standardize(images, self._mean, self._std),
                                self.feature_layer)
    return jnp.percentile(x.astype(jnp.float32), jnp.asarray(
        FEATURE_QUANTILES, jnp.float32))

  # Host-side wrappers.

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state from `rng`, replicated on the mesh."""
    return self._init_jit(rng)

  def data_init(self, state: TrainState) -> tuple[TrainState, float]:
    """Runs the model's `data_init` (e.g. airbench's whitening conv, from the
    training images on the host); returns the state and the seconds it took
    (airbench counts them in its training time)."""
    t0 = time.perf_counter()
    ds = self.data.host
    params = self.model.data_init(jax.device_get(state.params),
                                  ds.train_images, ds.mean, ds.std)
    state = state.replace(params=jax.device_put(params, self.data.replicated))
    jax.block_until_ready(state.params)
    return state, time.perf_counter() - t0

  def epoch_perm(self, train_rng: jax.Array, epoch: int) -> jax.Array:
    """The permutation of (1-based) `epoch` for a member's train rng."""
    return self.perm(jax.random.fold_in(jax.random.fold_in(train_rng, 1),
                                        epoch))

  def compile(self, state: Any, rng: Any, *, stacked: bool = False,
              scan: bool = True) -> tuple[Compiled, float]:
    """Compiles every step ahead of time; returns them and the seconds.

    `stacked`: `state` and `rng` are stacks over members (leading axis) and
    the functions are vmapped over them. The compiler options are the
    platform's (SpeedOptions.compiler_options) either way. `scan=False`
    skips the whole-epoch program even where SpeedOptions.scan_epoch asks
    for it.
    """
    t0 = time.perf_counter()
    opts = self.speed.compiler_options
    d = self.data

    def build(fn, axes, donate):
      fn = jax.vmap(fn, in_axes=axes) if stacked else fn
      return jax.jit(fn, donate_argnums=(0,) if donate else ())

    perm = self.perm(jax.random.key(0))
    if stacked:
      k = jax.tree.leaves(state)[0].shape[0]
      perm = jax.device_put(jnp.stack([perm] * k), d.replicated)
    # The single step is compiled in scan mode too: a resumed epoch that
    # starts mid-way runs it.
    train = build(self.train_batch, _TRAIN_AXES, True).lower(
        state, d.train_images, d.train_labels, perm, np.int32(0),
        rng).compile(compiler_options=opts)
    scan_fn = None
    if scan and self.speed.scan_epoch:
      scan_fn = build(self.train_scan, _SCAN_AXES, True).lower(
          state, d.train_images, d.train_labels, perm,
          rng).compile(compiler_options=opts)
    evals = {split: build(self.eval_batch, _EVAL_AXES, False).lower(
        state, x, y, np.int32(0)).compile(compiler_options=opts)
             for split, (x, y, _) in d.eval_sets.items()}
    features = None
    if self.feature_layer:
      features = build(self.feature_quantiles, _FEATURE_AXES, False).lower(
          state, d.probe_images).compile(compiler_options=opts)
    return (Compiled(train=train, scan=scan_fn, eval=evals, features=features,
                     compiler_options=dict(opts)),
            time.perf_counter() - t0)
