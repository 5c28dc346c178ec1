"""Refuses an impossible config before any data is read or code compiled.

One function, `validate(config)`, asks each stage to check its own section
(data, model, optimizer and schedule, augmentation, checkpoints) and checks
the train section itself. It builds nothing that costs: the model is checked
by name and options, the optimizer and the augmentation pipeline by
parsing, the PRNG by asking JAX whether it knows the implementation.
"""
from __future__ import annotations

import difflib

import jax
import jax.numpy as jnp
import ml_collections

from jaxreg import augment
from jaxreg import config as config_lib
from jaxreg import data
from jaxreg import models
from jaxreg import optim
from jaxreg import schedules

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
RNG_IMPLS = ("threefry4x32", "threefry2x32", "philox4x32")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key, its value and what to change."""
  check_known_keys(config)
  data.validate(config.dataset)
  optim.validate(config.optimizer)
  models.build_model(config.model, num_classes=10)  # Validates, cheap.
  t = config.train
  # Checks names and options, and that extra cutout images fit the batch.
  augment.output_batch_size(config.augment, max(t.batch_size, 1))
  # A warmup or peak must end within the run.
  schedules.validate(config.optimizer.schedule, t.epochs)
  if t.batch_size < 1:
    raise ValueError(f"config.train.batch_size={t.batch_size} must be >= 1")
  if t.epochs < 1:
    raise ValueError(f"config.train.epochs={t.epochs} must be >= 1")
  if t.eval_batch_size < 1:
    raise ValueError(
        f"config.train.eval_batch_size={t.eval_batch_size} must be >= 1")
  if not 0.0 <= t.label_smoothing < 1.0:
    raise ValueError(
        f"config.train.label_smoothing={t.label_smoothing} must be in [0, 1)")
  if t.tta not in config_lib.TTA_MODES:
    raise ValueError(f"config.train.tta={t.tta!r}; valid choices: "
                     f"{', '.join(map(repr, config_lib.TTA_MODES))}")
  if t.ema_decay != 0:
    if t.ema_start_epoch >= t.epochs:
      raise ValueError(
          f"config.train.ema_start_epoch={t.ema_start_epoch} (0-based) must "
          f"be smaller than train.epochs={t.epochs}, or the weight average "
          "never starts; lower it, or set ema_decay=0")
    # Checks the other options; the steps check again with their steps
    # per epoch.
    optim.make_lookahead(t, steps_per_epoch=t.ema_every
                         if isinstance(t.ema_every, int) and t.ema_every > 0
                         else 1)
  if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
    raise ValueError(f"config.target_accuracy={config.target_accuracy} is a "
                     "fraction in (0, 1], e.g. 0.87")
  if not isinstance(t.log_every_steps, int) or t.log_every_steps < 1:
    raise ValueError(f"config.train.log_every_steps={t.log_every_steps!r} "
                     "must be an integer >= 1")
  parse_profile_steps(t.profile_steps)
  check_speed_options(t)
  check_checkpoint(config)
  check_model_input(config)


def check_known_keys(config: ml_collections.ConfigDict) -> None:
  """Refuses a key that is no option of jaxreg (a study file or script that
  set a misspelled field on an unlocked config), with the closest ones."""
  valid = config_lib.dotted_keys(config_lib.base_config())
  unknown = [k for k in config_lib.dotted_keys(config) if k not in valid]
  if unknown:
    key = unknown[0]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(close)}?" if close
            else "jaxreg/config.py lists every option")
    raise ValueError(f"config.{key} is not an option of jaxreg; {hint}")


# Norms whose options constrain the channels of every layer they normalize:
# only for these is the model traced (abstractly) at validation.
_SHAPE_CHECKED_NORMS = ("group",)


def check_model_input(config: ml_collections.ConfigDict) -> None:
  """Refuses a model/norm combination that cannot work on the dataset's
  images (e.g. num_groups not dividing some layer's channels), by tracing
  the model's init abstractly at the dataset's input shape (no data read,
  nothing compiled)."""
  if config.model.norm not in _SHAPE_CHECKED_NORMS:
    return
  image_shape, num_classes = data.info(config.dataset)
  model = models.build_model(config.model, num_classes)
  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  jax.eval_shape(lambda x: model.init({"params": key, "dropout": key}, x,
                                      train=False), x)


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """`"A:B"` -> (A, B): trace global steps A..B-1; "" -> None.

  Raises:
    ValueError: not two integers 0 <= A < B.
  """
  if not spec:
    return None
  try:
    a, b = (int(x) for x in spec.split(":"))
  except ValueError:
    a = b = -1
  if not 0 <= a < b:
    raise ValueError(
        f"config.train.profile_steps={spec!r}: expected 'A:B' with integers "
        "0 <= A < B (global steps A to B-1 are traced), e.g. '10:20'")
  return a, b


def check_speed_options(t: ml_collections.ConfigDict,
                        num_devices: int = 1) -> None:
  """Refuses a PRNG or compute dtype this JAX cannot run on `num_devices`."""
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


def check_checkpoint(config: ml_collections.ConfigDict) -> None:
  """Refuses impossible `config.checkpoint` settings."""
  c = config.checkpoint
  if not isinstance(c.every_epochs, int) or c.every_epochs < 0:
    raise ValueError(
        f"config.checkpoint.every_epochs={c.every_epochs!r} must be an integer "
        ">= 0 (0 = only at the end)")
  if not isinstance(c.keep, int) or c.keep < 1:
    raise ValueError(f"config.checkpoint.keep={c.keep!r} must be an integer "
                     ">= 1: resuming needs the latest checkpoint")
  if c.keep_best and not config.dataset.val_fraction > 0:
    raise ValueError(
        "config.checkpoint.keep_best=True ranks checkpoints by validation "
        "accuracy, but there is no validation split: set "
        "config.dataset.val_fraction (e.g. 0.1) or keep_best=False")
