"""The config: one ConfigDict composed from each stage's own section.

Study files in configs/ start from `base_config()` and change what their
study fixes. Every option a user may set exists here with a default, so a
locked config refuses a misspelled key (`--config.optimizer.lr2=...`).
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Every option of a run, with defaults (SGD, MNIST CNN, BatchNorm)."""
  from jaxreg import augment, data, models, optim

  c = ml_collections.ConfigDict()
  c.name = "run"  # The study's name, shown in reports.
  c.seed = 0
  c.dataset = data.default_config()
  c.model = models.default_config()
  c.optimizer = optim.default_config()
  c.augment = ""  # Pipeline spec, e.g. "pad_crop(pad=4)|flip"; see augment.py.
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128,
      epochs=20,
      eval_batch_size=1000,
      label_smoothing=0.0,
      # Data-parallel devices for one run: 0 = every local device.
      num_devices=0,
      # Evaluate on the test split every N epochs (and always at the end).
      eval_every=1,
      # Layer path whose activation quantiles are tracked per epoch (S4).
      feature_layer=config_dict.placeholder(str),
      # Seconds between progress lines inside an epoch; 0 = per epoch only.
      log_every_s=30.0,
      # Test-time augmentation at evaluation: "" | "flip" | "flip_translate"
      # (logits averaged over views; train.tta_logits).
      tta="",
      # Lookahead weight average (airbench; optim.LookaheadEMA): every
      # ema_every steps from epoch ema_start_epoch (0-based) on,
      # ema <- rho*ema + (1-rho)*weights, weights <- ema, with
      # rho = ema_decay**ema_every * (step/total_steps)**ema_power.
      # ema_decay 0 = off.
      ema_decay=0.0,
      ema_every=5,
      ema_start_epoch=3,
      ema_power=3.0,
      # Speed (bench/README.md). PRNG of the dropout masks drawn inside
      # the step, one of train.RNG_IMPLS: threefry4x32 is unrolled and fused
      # by XLA; threefry2x32 (JAX's default) is a rolled loop on CPU, 8x
      # slower there. Augmentation always uses threefry2x32 (train_step).
      rng_impl="threefry4x32",
      # "float32" or "bfloat16": dtype of the forward and backward passes;
      # parameters, optimizer state, norm statistics and loss stay float32.
      compute_dtype="float32",
      # An epoch as one compiled lax.scan (True) or a Python loop over a
      # jitted step (False); None: the measured choice for the platform
      # (train.SCAN_EPOCH_DEFAULT; the loop on CPU).
      scan_epoch=config_dict.placeholder(bool),
      # On CPU, compile with train.XLA_CPU_OPTIONS; False: XLA's defaults.
      xla_cpu_tuning=True,
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_epochs=1,  # 0 = only at the end.
      keep=2,
      keep_best=False,  # Also keep the best by validation accuracy.
  ))
  # Wall-clock time to this test accuracy is reported (S1 uses 0.87).
  c.target_accuracy = config_dict.placeholder(float)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses impossible settings before any data is read or code compiled."""
  from jaxreg import augment, data, models, optim, schedules

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
  from jaxreg import train as train_lib
  if t.tta not in train_lib.TTA_MODES:
    raise ValueError(f"config.train.tta={t.tta!r}; valid choices: "
                     f"{', '.join(map(repr, train_lib.TTA_MODES))}")
  if t.ema_decay != 0:
    if t.ema_start_epoch >= t.epochs:
      raise ValueError(
          f"config.train.ema_start_epoch={t.ema_start_epoch} (0-based) must "
          f"be smaller than train.epochs={t.epochs}, or the weight average "
          "never starts; lower it, or set ema_decay=0")
    # Checks the other options; the trainer checks again with its steps
    # per epoch.
    optim.make_lookahead(t, steps_per_epoch=t.ema_every
                         if isinstance(t.ema_every, int) and t.ema_every > 0
                         else 1)
  if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
    raise ValueError(f"config.target_accuracy={config.target_accuracy} is a "
                     "fraction in (0, 1], e.g. 0.87")


# --- Dotted overrides -------------------------------------------------------


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_keys(v, prefix + k + "."))
  return out


def parse_value(text: str) -> Any:
  """'0.1' -> 0.1, '(1,2)' -> (1, 2), 'group' -> 'group' (as absl flags do)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with dotted-key overrides applied.

  Unknown keys are refused with the closest valid keys; values must match
  the type of the default (ints widen to floats), as on the command line.
  """
  # A deep copy keeps placeholder types (None-valued fields stay typed).
  config = copy.deepcopy(config)
  valid = _keys(config)
  for key, value in overrides.items():
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise KeyError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"config key {key!r}: {e}") from None
  return config


def load_config_file(path: str) -> tuple[Any, str | None]:
  """Imports configs/<study>.py[:arg]; returns (module, arg)."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config file {path!r}")
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (arg or None)


def parse_args(arg: str | None, valid: Sequence[str], file: str) -> frozenset[str]:
  """Splits a config file's ':a,b' argument, refusing unknown words."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  unknown = [t for t in tokens if t not in valid]
  if unknown:
    raise ValueError(
        f"configs/{Path(file).name}: unknown arg(s) "
        f"{', '.join(map(repr, unknown))}; valid args: {', '.join(valid)} "
        "(or none), combined with ','")
  return frozenset(tokens)


def sibling(file: str, name: str):
  """Another config file of the same folder, as a module: study files share
  recipes this way instead of copying them (`sibling(__file__, "norms.py")`)."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(file)),
                                       name))[0]


# --- Sweep helpers for configs/*.py -----------------------------------------


def product(**axes: Sequence[Any]) -> list[dict]:
  """Every combination: product(a=[1,2], b=[3]) -> [{a:1,b:3},{a:2,b:3}].

  Keys use "__" for "." so they can be keyword arguments:
  product(model__norm=["batch", "group"]).
  """
  keys = [k.replace("__", ".") for k in axes]
  return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


def zip_axes(**axes: Sequence[Any]) -> list[dict]:
  """Axes varied together: zip_axes(a=[1,2], b=[3,4]) -> [{a:1,b:3},{a:2,b:4}]."""
  lengths = {len(v) for v in axes.values()}
  if len(lengths) > 1:
    raise ValueError(f"zip_axes needs equal lengths, got "
                     f"{ {k: len(v) for k, v in axes.items()} }")
  keys = [k.replace("__", ".") for k in axes]
  return [dict(zip(keys, combo)) for combo in zip(*axes.values())]


def combine(*groups: Iterable[dict]) -> list[dict]:
  """Cartesian product of lists of override dicts, merged left to right."""
  out = [{}]
  for group in groups:
    out = [{**a, **b} for a in out for b in group]
  return out


def dedupe(variants: Iterable[dict]) -> list[dict]:
  """Drops repeated variants, keeping the first occurrence's order."""
  seen, out = set(), []
  for v in variants:
    key = tuple(sorted((k, repr(x)) for k, x in v.items()))
    if key not in seen:
      seen.add(key)
      out.append(dict(v))
  return out
