"""The optimizer: one optax chain, built in one place from `config.optimizer`.

Order of the chain (gradients flow top to bottom; each term is structurally
present only when the config enables it):

  1. AGC             adaptive gradient clipping (Brock et al. 2021) of the raw
                     gradient, unit-wise; params matching `agc_exclude` (the
                     classifier) are not clipped.     [agc_clip is not None]
  2. L1              g += l1 * sign(w) on params matching `l1_mask`. [l1 > 0]
  3. coupled decay   g += weight_decay * w on params matching
                     `weight_decay_mask`, before momentum, as PyTorch SGD's
                     `weight_decay` (L2 penalty); weight_decay / lr_multiplier
                     on params matching `lr_multiplier_mask` (see 9).
                     [weight_decay > 0, decoupled_weight_decay False, not adamw]
  4. global clip     clip_by_global_norm(grad_clip_norm); it sees the L1 and
                     coupled-decay terms. [grad_clip_norm is not None]
  5. preconditioner  sgd: momentum buffer b = momentum * b + g, step b (or
                     g + momentum * b with nesterov), exactly PyTorch SGD with
                     dampening 0 [momentum > 0]; adam/adamw: scale_by_adam.
  6. decoupled decay u += weight_decay * w after the preconditioner (SGDW /
                     AdamW), so it is scaled by the scheduled LR below:
                     w <- w - lr * (momentum step) - lr * weight_decay * w.
                     [weight_decay > 0 and (decoupled_weight_decay or adamw)]
  7. LR              u *= -(lr * schedule(step)); optax negates here, so the
                     chain's output is added to the params by apply_updates.
  8. gate LR         u *= gate_lr_multiplier on params named `gate`.
                     [gate_lr_multiplier != 1]
  9. LR multiplier   u *= lr_multiplier on params matching
                     `lr_multiplier_mask`. Their weight decay (3 or 6) was
                     divided by lr_multiplier, so lr * weight_decay, the
                     decay per step, stays that of the other params: the LR
                     is scaled, not the decay (airbench's `bias_scaler` for
                     BatchNorm biases). [lr_multiplier_mask set]
 10. frozen          u = 0 on params matching `frozen` (from the first step)
                     and on params matching `frozen_after` from update
                     schedules.epochs_to_steps(frozen_after_epochs,
                     steps_per_epoch) on (e.g.
                     airbench's fixed whitening conv and its bias, trained
                     for 3 epochs). Last in the chain, so nothing (decay,
                     AGC) moves a frozen param. [frozen / frozen_after set]

Injected hyperparameters: the whole chain is wrapped in
`optax.inject_hyperparams`, so the values of `learning_rate` (the scale of the
schedule, `cfg.lr`), `momentum` (sgd), `weight_decay`, `l1` and `agc_clip` live
in the optimizer state (`opt_state.hyperparams`, see `get_hyperparams` /
`set_hyperparams`) as arrays: changing them does not change the traced
program. Only the terms enabled in the config are in the chain and in that
dict; enabling a term (e.g. l1 from 0 to 1e-4) changes the structure and so
compiles a new step. Everything else (masks, nesterov, b1/b2/eps,
grad_clip_norm, agc_eps, the schedule's shape, gate_lr_multiplier) is static.

Masks select params by `re.search` on the "/"-joined param path, e.g.
"layer1/block0/conv1/kernel". The defaults (`jaxreg.config.optimizer_config`,
masks `config.KERNEL_REGEX`) give L1 and decay to conv and dense kernels
only: norm scales, biases and batch-instance gates get none.

The train step must call `project_params` after `optax.apply_updates` to keep
batch-instance gates in [0, 1].
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxreg import schedules
from jaxreg.registry import Registry

PyTree = Any
GATE_REGEX = r"(^|/)gate$"

_NO_PARAMS = "this transformation needs the params: call update(g, s, params)"

# The valid names; adamw is adam with decoupled weight decay.
OPTIMIZERS: Registry[str] = Registry("optimizer")
for _name in ("sgd", "adam", "adamw"):
  OPTIMIZERS.add(_name, _name)


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def path_mask(params: PyTree, regex: str) -> PyTree:
  """Tree of bools: True where `re.search(regex, "/"-joined path)` matches."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(pattern.search(_path_str(path))), params)


def _negated_mask(regex: str) -> Callable[[PyTree], PyTree]:
  return lambda params: jax.tree.map(lambda m: not m, path_mask(params, regex))


def _regex_mask(regex: str) -> Callable[[PyTree], PyTree]:
  return lambda params: path_mask(params, regex)


def project_params(params: PyTree) -> PyTree:
  """Clips every leaf named `gate` (batch-instance norm's rho) to [0, 1]."""
  pattern = re.compile(GATE_REGEX)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.clip(x, 0.0, 1.0)
      if pattern.search(_path_str(path)) else x, params)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3
                       ) -> optax.GradientTransformation:
  """AGC with unit-wise norms over every axis but the last (output) one.

  optax.adaptive_grad_clip infers the axes from `jnp.squeeze(x)`, which takes
  a whole-tensor norm for kernels with a single fan-in element (a 1x1 conv on
  one channel, shape [1, 1, 1, O]); choosing the axes per leaf from its rank
  avoids that. Vectors and scalars (biases, norm scales) are one unit each, as
  in the NFNets reference. Per unit: if |G| > clipping * max(|W|, eps),
  G <- clipping * max(|W|, eps) / |G| * G.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS)

    def clip(g, p):
      axis = tuple(range(p.ndim - 1)) if p.ndim > 1 else tuple(range(p.ndim))
      g_norm = optax.transforms.unitwise_norm(g, axis=axis)
      p_norm = optax.transforms.unitwise_norm(p, axis=axis)
      max_norm = clipping * jnp.maximum(p_norm, eps)
      return optax.transforms.unitwise_clip(g_norm, max_norm, g)

    return jax.tree.map(clip, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def add_l1(l1: float) -> optax.GradientTransformation:
  """Adds the gradient of l1 * sum|w|, i.e. l1 * sign(w) (0 at w = 0)."""

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS)
    return jax.tree.map(lambda g, p: g + l1 * jnp.sign(p).astype(g.dtype),
                        updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def zero_from_step(step: int) -> optax.GradientTransformation:
  """Passes updates through for update counts < `step`, then zeros them
  (a param frozen part-way through training)."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    keep = state.count < step
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)),
                           updates)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _decay(weight_decay, wd_mask: Callable, mult_regex: str | None,
           mult: float) -> list[optax.GradientTransformation]:
  """Weight decay on `wd_mask`; divided by `mult` on params matching
  `mult_regex`, whose step is multiplied by `mult` later in the chain."""
  if mult_regex is None:
    return [optax.add_decayed_weights(weight_decay, wd_mask)]
  mult_mask = _regex_mask(mult_regex)

  def split(select_mult: bool) -> Callable[[PyTree], PyTree]:
    return lambda params: jax.tree.map(
        lambda d, m: d and (m == select_mult), wd_mask(params),
        mult_mask(params))

  return [optax.add_decayed_weights(weight_decay, split(False)),
          optax.add_decayed_weights(weight_decay / mult, split(True))]


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _check_regex(field: str, regex: str) -> None:
  try:
    re.compile(regex)
  except (re.error, TypeError) as e:
    raise ValueError(f"optimizer.{field}={regex!r} is not a valid regular "
                     f"expression: {e}") from None


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Refuses bad optimizer settings with a message that says what to change.

  Raises:
    ValueError: unknown optimizer or schedule name (listing the valid ones),
      lr <= 0, momentum outside [0, 1), negative l1 / weight_decay,
      agc_clip <= 0, agc_eps <= 0, grad_clip_norm <= 0, bad adam betas/eps,
      negative gate_lr_multiplier, lr_multiplier <= 0, negative
      frozen_after_epochs, an invalid mask regex.
  """
  OPTIMIZERS.get(cfg.name)
  _check(cfg.lr > 0, f"optimizer.lr must be > 0, got {cfg.lr}")
  _check(0.0 <= cfg.momentum < 1.0,
         f"optimizer.momentum must be in [0, 1), got {cfg.momentum}")
  _check(cfg.weight_decay >= 0,
         f"optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")
  _check(cfg.l1 >= 0, f"optimizer.l1 must be >= 0, got {cfg.l1}")
  _check(cfg.agc_clip is None or cfg.agc_clip > 0,
         f"optimizer.agc_clip must be > 0 (or None to disable AGC), "
         f"got {cfg.agc_clip}")
  _check(cfg.agc_eps > 0, f"optimizer.agc_eps must be > 0, got {cfg.agc_eps}")
  _check(cfg.grad_clip_norm is None or cfg.grad_clip_norm > 0,
         f"optimizer.grad_clip_norm must be > 0 (or None to disable "
         f"clipping), got {cfg.grad_clip_norm}")
  _check(cfg.gate_lr_multiplier >= 0, f"optimizer.gate_lr_multiplier must be "
         f">= 0, got {cfg.gate_lr_multiplier}")
  _check(cfg.name == "sgd" or not cfg.nesterov,
         f"optimizer.nesterov applies to sgd only; set it to False for "
         f"{cfg.name!r}")
  _check(not cfg.nesterov or cfg.momentum > 0,
         "optimizer.nesterov needs momentum > 0 (as in PyTorch); set "
         "momentum or nesterov=False")
  if cfg.name in ("adam", "adamw"):
    _check(0.0 <= cfg.b1 < 1.0, f"optimizer.b1 must be in [0, 1), got {cfg.b1}")
    _check(0.0 <= cfg.b2 < 1.0, f"optimizer.b2 must be in [0, 1), got {cfg.b2}")
    _check(cfg.eps > 0, f"optimizer.eps must be > 0, got {cfg.eps}")
  _check(cfg.lr_multiplier > 0,
         f"optimizer.lr_multiplier must be > 0, got {cfg.lr_multiplier}")
  _check(cfg.frozen_after_epochs >= 0, f"optimizer.frozen_after_epochs must "
         f"be >= 0, got {cfg.frozen_after_epochs}")
  for field in ("weight_decay_mask", "l1_mask", "agc_exclude"):
    _check_regex(field, cfg[field])
  for field in ("lr_multiplier_mask", "frozen", "frozen_after"):
    if cfg[field] is not None:
      _check_regex(field, cfg[field])
  schedules.validate(cfg.schedule)


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                num_epochs: float) -> optax.Schedule:
  """The learning rate at each step (for logging): cfg.lr * schedule shape.

  Matches what the chain applies while `learning_rate` in the optimizer state
  keeps its configured value.
  """
  return schedules.make_schedule(cfg.schedule, cfg.lr, steps_per_epoch,
                                 num_epochs)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   num_epochs: float) -> optax.GradientTransformation:
  """Builds the chain described in the module docstring.

  Args:
    cfg: config.optimizer.
    steps_per_epoch: optimizer steps per epoch (schedule conversion).
    num_epochs: run length in epochs (schedule conversion).

  Returns:
    An optax transformation whose state carries the injected hyperparameters.

  Raises:
    ValueError: from `validate` and the schedule, before anything is traced.
  """
  validate(cfg)
  # Linear in base_lr, so the injected `learning_rate` scales the shape.
  shape = schedules.make_schedule(cfg.schedule, 1.0, steps_per_epoch,
                                  num_epochs)
  name = cfg.name
  use_agc = cfg.agc_clip is not None
  use_l1 = cfg.l1 > 0
  use_wd = cfg.weight_decay > 0
  decoupled = name == "adamw" or bool(cfg.decoupled_weight_decay)
  use_momentum = name == "sgd" and cfg.momentum > 0
  nesterov = bool(cfg.nesterov)
  agc_eps = float(cfg.agc_eps)
  clip_norm = None if cfg.grad_clip_norm is None else float(
      cfg.grad_clip_norm)
  gate_mult = float(cfg.gate_lr_multiplier)
  b1, b2, eps = float(cfg.b1), float(cfg.b2), float(cfg.eps)
  wd_mask = _regex_mask(cfg.weight_decay_mask)
  l1_mask = _regex_mask(cfg.l1_mask)
  agc_mask = _negated_mask(cfg.agc_exclude)
  gate_mask = _regex_mask(GATE_REGEX)
  mult = float(cfg.lr_multiplier)
  mult_regex = cfg.lr_multiplier_mask
  use_mult = mult_regex is not None
  frozen_regex = cfg.frozen
  late_regex = cfg.frozen_after
  late_step = schedules.epochs_to_steps(cfg.frozen_after_epochs,
                                       steps_per_epoch)

  injected = {"learning_rate": float(cfg.lr)}
  if use_momentum:
    injected["momentum"] = float(cfg.momentum)
  if use_wd:
    injected["weight_decay"] = float(cfg.weight_decay)
  if use_l1:
    injected["l1"] = float(cfg.l1)
  if use_agc:
    injected["agc_clip"] = float(cfg.agc_clip)

  def chain(**hp) -> optax.GradientTransformation:
    parts = []
    if use_agc:
      parts.append(optax.masked(
          adaptive_grad_clip(hp["agc_clip"], agc_eps), agc_mask))
    if use_l1:
      parts.append(optax.masked(add_l1(hp["l1"]), l1_mask))
    if use_wd and not decoupled:
      parts.extend(_decay(hp["weight_decay"], wd_mask, mult_regex, mult))
    if clip_norm is not None:
      parts.append(optax.clip_by_global_norm(clip_norm))
    if name == "sgd":
      if use_momentum:
        parts.append(optax.trace(decay=hp["momentum"], nesterov=nesterov))
    else:
      parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if use_wd and decoupled:
      parts.extend(_decay(hp["weight_decay"], wd_mask, mult_regex, mult))
    lr = hp["learning_rate"]
    parts.append(optax.scale_by_learning_rate(lambda count: lr * shape(count)))
    if gate_mult != 1.0:
      parts.append(optax.masked(optax.scale(gate_mult), gate_mask))
    if use_mult:
      parts.append(optax.masked(optax.scale(mult), _regex_mask(mult_regex)))
    if frozen_regex is not None:
      parts.append(optax.masked(optax.set_to_zero(),
                                _regex_mask(frozen_regex)))
    if late_regex is not None:
      parts.append(optax.masked(zero_from_step(late_step),
                                _regex_mask(late_regex)))
    return optax.chain(*parts)

  # inject_hyperparams reads the factory's signature to decide what to inject;
  # give it exactly the enabled names.
  chain.__signature__ = inspect.Signature([
      inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in injected])
  return optax.inject_hyperparams(chain)(**injected)


def _find_injected(opt_state):
  if isinstance(opt_state, optax.InjectStatefulHyperparamsState):
    return opt_state
  raise ValueError("optimizer state was not built by jaxreg.optim."
                   "make_optimizer (no injected hyperparameters at its top)")


def get_hyperparams(opt_state) -> dict[str, jax.Array]:
  """The injected hyperparameter values held in the optimizer state."""
  return dict(_find_injected(opt_state).hyperparams)


def set_hyperparams(opt_state, **values: float):
  """Returns `opt_state` with injected hyperparameters replaced.

  Only enabled terms are injected; a name that is not raises ValueError
  listing the ones that are.
  """
  state = _find_injected(opt_state)
  unknown = sorted(set(values) - set(state.hyperparams))
  if unknown:
    raise ValueError(
        f"hyperparameters {', '.join(unknown)} are not injected in this "
        f"optimizer; injected: {', '.join(sorted(state.hyperparams))} (a term "
        "is present only when enabled in the config)")
  hp = dict(state.hyperparams)
  for k, v in values.items():
    hp[k] = jnp.asarray(v, dtype=jnp.asarray(hp[k]).dtype)
  return state._replace(hyperparams=hp)


# --- Weight averaging -------------------------------------------------------


class LookaheadEMA:
  """airbench's "lookahead" weight average, applied after optimizer updates.

  Every `every` steps from epoch `start_epoch` (0-based) on, the average
  moves towards the live weights and the live weights are replaced by it:

    rho = decay ** every * (step / total_steps) ** power
    ema <- rho * ema + (1 - rho) * live;   live <- ema

  (`step` is the 1-based count of updates done; the decay warms up from 0
  so the average follows the weights early and averages strongly at the
  end.) The first such step only starts the average (rho = 0: ema = live).
  At the end of every epoch, once started, live <- ema, discarding the
  steps since the last average, as airbench does before it evaluates. So
  the weights evaluated and saved after an epoch are the averaged ones;
  the average is over weights and the BatchNorm running statistics alike
  (airbench averages its whole state dict).

  Unlike optax.lookahead, the decay changes with the step and the running
  statistics are averaged too, which is why this acts on the train state
  rather than inside the optimizer chain.
  """

  def __init__(self, *, decay: float, every: int, start_epoch: int,
               power: float, steps_per_epoch: int, total_steps: int):
    _check(0.0 < decay < 1.0, f"train.ema_decay must be in (0, 1) (0 turns "
           f"the weight average off), got {decay}")
    _check(isinstance(every, int) and every >= 1,
           f"train.ema_every must be an integer >= 1, got {every!r}")
    _check(isinstance(start_epoch, int) and start_epoch >= 0,
           f"train.ema_start_epoch must be an integer >= 0, got "
           f"{start_epoch!r}")
    _check(power >= 0, f"train.ema_power must be >= 0, got {power}")
    self.decay, self.every, self.power = float(decay), every, float(power)
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    # The first averaging step: a multiple of `every` in epoch start_epoch
    # or later.
    first_in_window = start_epoch * steps_per_epoch + 1
    self.first_step = -(-first_in_window // every) * every
    _check(self.first_step <= total_steps,
           f"train.ema_start_epoch={start_epoch} with ema_every={every} "
           f"leaves no averaging step in the {total_steps} steps of the run "
           f"({steps_per_epoch} per epoch); lower ema_start_epoch or "
           "ema_every")

  def rho(self, step: jax.Array) -> jax.Array:
    """The weight of the old average at (1-based) `step`: 0 when the average
    starts, else decay ** every * (step / total_steps) ** power."""
    frac = jnp.asarray(step, jnp.float32) / self.total_steps
    rho = self.decay ** self.every * frac ** self.power
    return jnp.where(step == self.first_step, 0.0, rho)

  def __call__(self, step: jax.Array, live: PyTree, ema: PyTree
               ) -> tuple[PyTree, PyTree]:
    """(live, ema) after update number `step` (1-based) has been applied."""
    step = jnp.asarray(step)
    sync = (step >= self.first_step) & (step % self.every == 0)
    epoch_end = (step >= self.first_step) & (
        step % self.steps_per_epoch == 0)
    rho = self.rho(step)

    def average(e, x):
      return jnp.where(sync, (rho * e + (1.0 - rho) * x).astype(x.dtype), e)

    ema = jax.tree.map(average, ema, live)
    live = jax.tree.map(lambda e, x: jnp.where(sync | epoch_end, e, x),
                        ema, live)
    return live, ema


def make_lookahead(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> LookaheadEMA | None:
  """The weight average `config.train.ema_*` asks for; None when
  `ema_decay` is 0 (off)."""
  if train_cfg.ema_decay == 0:
    return None
  return LookaheadEMA(
      decay=float(train_cfg.ema_decay), every=train_cfg.ema_every,
      start_epoch=train_cfg.ema_start_epoch, power=float(train_cfg.ema_power),
      steps_per_epoch=steps_per_epoch,
      total_steps=steps_per_epoch * int(train_cfg.epochs))
