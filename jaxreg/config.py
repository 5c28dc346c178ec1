"""The config: one ConfigDict with a section per stage, and sweep helpers.

Study files in configs/ start from `base_config()` and change what their
study fixes. Every option a user may set exists here with a default, so a
locked config refuses a misspelled key (`--config.optimizer.lr2=...`).
Plain data only: this module imports no JAX, so planning a sweep (a dry
run, a scheduler's array size) never starts a backend. The checks that
need the stages live in validation.py.
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


# Parameter paths that weight decay and L1 apply to by default: conv and
# dense kernels, not norm scales, biases or gates.
KERNEL_REGEX = r"(^|/)kernel$"

# Test-time views for config.train.tta (augment.tta_logits draws them).
TTA_MODES = ("", "flip", "flip_translate")


def dataset_config() -> ml_collections.ConfigDict:
  """config.dataset (data.py)."""
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


def norm_kwargs_config() -> ml_collections.ConfigDict:
  """`config.model.norm_kwargs`: every option of every norm, unset (None).

  Only the options that are set are passed to the chosen norm (norms.py), so
  a study may set e.g. `num_groups` for `group`; setting it for `batch` is
  refused.
  """
  return ml_collections.ConfigDict({
      # group: number of channel groups (default 2); exclusive with group_size.
      "num_groups": config_dict.placeholder(int),
      # group: channels per group (group_size=1 is instance norm).
      "group_size": config_dict.placeholder(int),
      # batch, batch_flax, batch_instance: Flax convention, default 0.9.
      "momentum": config_dict.placeholder(float),
      # every norm but none: added to the variance, default 1e-5.
      "epsilon": config_dict.placeholder(float),
      # batch, batch_instance: ghost batch size for the batch statistics.
      "virtual_batch_size": config_dict.placeholder(int),
      # batch, batch_instance: PyTorch's n/(n-1) running variance.
      "unbiased_running_var": config_dict.placeholder(bool),
  })


def model_config() -> ml_collections.ConfigDict:
  """config.model: every option of every model, flat, with its default.

  Each model is registered with the options it reads (jaxreg/models,
  `models.MODELS`); models.validate refuses an option the chosen model does
  not read when it is set to anything but its default.
  """
  cfg = ml_collections.ConfigDict()
  # Every model.
  cfg.name = "mnist_cnn"  # One of models.MODELS.names().
  # Every model but nf_resnet (models.NORM_FREE_MODELS), which accepts
  # "none" besides the default.
  cfg.norm = "batch"  # One of norms.NORMS.names().
  cfg.norm_kwargs = norm_kwargs_config()
  # Every model but airbench. Dropout probability: every mnist_cnn block,
  # between the convs of every cifar_resnet block, inside resnet9's
  # residuals, and in the first dropout_layers slots of resnet50 /
  # nf_resnet bottlenecks.
  cfg.dropout = 0.0
  # resnet50 / nf_resnet: one probability per dropout slot (exactly
  # dropout_layers of them, e.g. (0.1, 0.2, 0.3)); when set it wins over
  # `dropout`.
  cfg.dropout_per_slot = config_dict.placeholder(tuple)
  # resnet50: first k of the 3 bottleneck slots get a norm (nf_resnet
  # accepts 0, which is what it is).
  cfg.norm_layers = 3
  cfg.dropout_layers = 0  # resnet50 / nf_resnet: first k slots get dropout.
  cfg.depth = 14  # cifar_resnet: 6n+2.
  cfg.stage_sizes = (3, 4, 6, 3)  # resnet50 / nf_resnet blocks per stage.
  # resnet50 / nf_resnet / resnet9 / airbench base channel width.
  cfg.width = 64
  cfg.logit_scale = 0.125  # resnet9 / airbench logits multiplier.
  cfg.nf_alpha = 0.2  # nf_resnet residual branch scale.
  # airbench: side of the whitening conv's patches, the eps added to their
  # eigenvalues, and how many (first) training images estimate them.
  cfg.whiten_patch = 2
  cfg.whiten_eps = 5e-4
  cfg.whiten_images = 5000
  # airbench: dtype its convs and classifier compute in (params, norms and
  # logits stay float32); one of models.COMPUTE_DTYPES.
  cfg.dtype = "float32"
  # mnist_cnn: how its convs are computed, one of fastconv.CONV_IMPLS
  # ("auto": matrix-product convs where they measured faster on CPU,
  # bench/conv_impl.py; "xla": nn.Conv everywhere; "slices": everywhere).
  cfg.conv_impl = "auto"
  return cfg


def schedule_config() -> ml_collections.ConfigDict:
  """Options of every schedule (config.optimizer.schedule, schedules.py)."""
  c = ml_collections.ConfigDict()
  c.name = "constant"
  # Linear warmup from 0 (cosine, warmup_linear only).
  c.warmup_epochs = 0.0
  # step: multiply by decay_factor every decay_epochs epochs.
  c.decay_epochs = 30.0
  # multistep: multiply by decay_factor at each of these epochs.
  c.milestones = (50, 75)
  c.decay_factor = 0.1
  # Lower bound as a fraction of optimizer.lr: the cosine end value and the
  # lower bound of the cyclic schedules.
  c.min_lr_fraction = 0.0
  # onecycle: epoch at which the LR peaks at optimizer.lr.
  c.peak_epoch = 5.0
  # Cyclic schedules: half a cycle (Smith's stepsize), in epochs.
  c.half_cycle_epochs = 4.0
  # exp_range: amplitude multiplied by gamma ** step (per optimizer step).
  c.gamma = 0.99994
  return c


def optimizer_config() -> ml_collections.ConfigDict:
  """Options of the optimizer chain (config.optimizer, optim.py)."""
  c = ml_collections.ConfigDict()
  c.name = "sgd"  # sgd | adam | adamw (adamw always decouples weight decay).
  c.lr = 0.1  # Peak / base LR: the scale of the schedule.
  c.momentum = 0.9  # sgd only; 0 removes the momentum buffer.
  c.nesterov = False
  c.weight_decay = 0.0
  # False: coupled L2 added to the gradient before momentum (PyTorch SGD).
  # True: decoupled, SGDW / AdamW style.
  c.decoupled_weight_decay = False
  c.weight_decay_mask = KERNEL_REGEX
  c.l1 = 0.0
  c.l1_mask = KERNEL_REGEX
  c.agc_clip = config_dict.placeholder(float)  # None: no AGC.
  c.agc_eps = 1e-3
  c.agc_exclude = r"(^|/)classifier(/|$)"
  c.grad_clip_norm = config_dict.placeholder(float)  # None: no clipping.
  c.gate_lr_multiplier = 1.0
  # Regex of params whose LR (not their weight decay) is multiplied by
  # lr_multiplier; None: none.
  c.lr_multiplier_mask = config_dict.placeholder(str)
  c.lr_multiplier = 1.0
  # Regex of params that never change (their updates are zeroed); None: none.
  c.frozen = config_dict.placeholder(str)
  # Regex of params frozen from epoch frozen_after_epochs on; None: none.
  c.frozen_after = config_dict.placeholder(str)
  c.frozen_after_epochs = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.schedule = schedule_config()
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every option of a run, with defaults (SGD, MNIST CNN, BatchNorm)."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # The study's name, shown in reports.
  c.seed = 0
  # Replicas per variant a sweep runs (seeds 0..num_seeds-1; --seeds=N).
  c.num_seeds = 1
  c.dataset = dataset_config()
  c.model = model_config()
  c.optimizer = optimizer_config()
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
      # Train loss, accuracy and LR (mean over the last N steps) go to
      # steps.jsonl and TensorBoard every N steps (writers.py).
      log_every_steps=100,
      # TensorBoard event files in every run directory (writers.py).
      tensorboard=True,
      # "A:B": a jax.profiler trace of global steps A..B-1 into the run
      # directory (TensorBoard's profile plugin); "" = off.
      profile_steps="",
      # Test-time augmentation at evaluation: "" | "flip" | "flip_translate"
      # (logits averaged over views; augment.tta_logits).
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


# --- Dotted overrides -------------------------------------------------------


def dotted_keys(config: ml_collections.ConfigDict,
                prefix: str = "") -> list[str]:
  """Every key of `config` as a dotted path, sections included."""
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(dotted_keys(v, prefix + k + "."))
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
  valid = dotted_keys(config)
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
