"""Learning-rate schedules, selected by name from `config.optimizer.schedule`.

Every option is given in epochs (floats allowed) and converted to optimizer
steps with `steps_per_epoch`, so a schedule keeps its shape when the batch
size changes. A schedule maps the 0-based update count (the count optax
passes, i.e. the number of updates already applied) to a learning rate.

Every schedule here is linear in `base_lr` (lower bounds are given as a
fraction of it, `min_lr_fraction`), which lets `jaxreg.optim` build the shape
once with `base_lr=1.0` and inject the scale as a hyperparameter.

Entries (`SCHEDULES`):
  constant       base_lr throughout.
  step           base_lr * decay_factor ** floor(epoch / decay_epochs).
  multistep      base_lr * decay_factor ** (number of milestones <= epoch).
  cosine         optional linear warmup 0 -> base_lr over warmup_epochs, then
                 cosine annealing to min_lr_fraction * base_lr at the end.
  onecycle       DavidNet piecewise linear: 0 -> base_lr at peak_epoch -> 0 at
                 the last epoch (e.g. knots [0, 5, 24] epochs).
  triangular, triangular2, exp_range
                 Smith 2017 cyclic LR between min_lr_fraction * base_lr and
                 base_lr, half cycle (Smith's "stepsize") = half_cycle_epochs;
                 triangular2 halves the amplitude every cycle, exp_range
                 scales it by gamma ** step (gamma per optimizer step).
  warmup_linear  linear warmup 0 -> base_lr over warmup_epochs, then linear
                 decay to 0 at the end.

Only cosine and warmup_linear take a warmup; the others refuse
warmup_epochs > 0 rather than ignore it. The options' defaults are
`jaxreg.config.schedule_config()`.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax

from jaxreg.registry import Registry

ScheduleBuilder = Callable[..., optax.Schedule]
SCHEDULES: Registry[ScheduleBuilder] = Registry("schedule")

_WARMUP_SCHEDULES = ("cosine", "warmup_linear")


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """Epochs -> whole optimizer steps, halves rounded up (not Python's
  round-to-even). Every option given in epochs converts this way."""
  return int(math.floor(float(epochs) * steps_per_epoch + 0.5))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def validate(cfg: ml_collections.ConfigDict,
             num_epochs: float | None = None) -> None:
  """Refuses unknown names and negative or inconsistent options.

  Args:
    cfg: config.optimizer.schedule.
    num_epochs: the run length; when given, options are also checked against
      it (a warmup or peak must end before the last epoch).

  Raises:
    ValueError: naming the offending field and what to change.
  """
  SCHEDULES.get(cfg.name)  # Lists the valid names when unknown.
  p = "optimizer.schedule."
  _require(cfg.warmup_epochs >= 0,
           f"{p}warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
  _require(cfg.warmup_epochs == 0 or cfg.name in _WARMUP_SCHEDULES,
           f"{p}warmup_epochs={cfg.warmup_epochs} is only supported by "
           f"{', '.join(_WARMUP_SCHEDULES)}; set it to 0 for schedule "
           f"{cfg.name!r}")
  _require(0.0 <= cfg.min_lr_fraction <= 1.0,
           f"{p}min_lr_fraction must be in [0, 1], got {cfg.min_lr_fraction}")
  if num_epochs is not None:
    _require(num_epochs > 0, f"num_epochs must be > 0, got {num_epochs}")
  name = cfg.name
  if name == "step":
    _require(cfg.decay_epochs > 0,
             f"{p}decay_epochs must be > 0, got {cfg.decay_epochs}")
  if name in ("step", "multistep"):
    _require(0.0 < cfg.decay_factor <= 1.0,
             f"{p}decay_factor must be in (0, 1], got {cfg.decay_factor}")
  if name == "multistep":
    m = tuple(cfg.milestones)
    _require(len(m) > 0, f"{p}milestones must name at least one epoch")
    _require(all(x > 0 for x in m),
             f"{p}milestones must be positive epochs, got {m}")
    _require(all(a < b for a, b in zip(m, m[1:])),
             f"{p}milestones must be strictly increasing, got {m}")
  if name == "onecycle":
    _require(cfg.peak_epoch > 0,
             f"{p}peak_epoch must be > 0, got {cfg.peak_epoch}")
    if num_epochs is not None:
      _require(cfg.peak_epoch < num_epochs,
               f"{p}peak_epoch={cfg.peak_epoch} must be before the last "
               f"epoch ({num_epochs}); lower peak_epoch or train longer")
  if name in ("triangular", "triangular2", "exp_range"):
    _require(cfg.half_cycle_epochs > 0,
             f"{p}half_cycle_epochs must be > 0, got {cfg.half_cycle_epochs}")
  if name == "exp_range":
    _require(0.0 < cfg.gamma <= 1.0,
             f"{p}gamma must be in (0, 1], got {cfg.gamma}")
  if name in _WARMUP_SCHEDULES and num_epochs is not None:
    _require(cfg.warmup_epochs < num_epochs,
             f"{p}warmup_epochs={cfg.warmup_epochs} must be shorter than "
             f"the run ({num_epochs} epochs)")


def make_schedule(cfg: ml_collections.ConfigDict, base_lr: float,
                  steps_per_epoch: int, num_epochs: float) -> optax.Schedule:
  """Builds the schedule named by `cfg.name`.

  Args:
    cfg: config.optimizer.schedule.
    base_lr: the peak (or constant) learning rate, > 0.
    steps_per_epoch: optimizer steps per epoch, >= 1.
    num_epochs: length of the run in epochs.

  Returns:
    An optax schedule: 0-based step count -> learning rate.

  Raises:
    ValueError: on an unknown name or bad option, before anything is traced.
  """
  _require(base_lr > 0, f"base_lr must be > 0, got {base_lr}")
  _require(int(steps_per_epoch) == steps_per_epoch and steps_per_epoch >= 1,
           f"steps_per_epoch must be a positive integer, got {steps_per_epoch}")
  validate(cfg, num_epochs)
  total_steps = epochs_to_steps(num_epochs, steps_per_epoch)
  _require(total_steps >= 1,
           f"num_epochs={num_epochs} gives no optimizer step at "
           f"{steps_per_epoch} steps per epoch")
  build = SCHEDULES.get(cfg.name)
  schedule = build(cfg, float(base_lr), int(steps_per_epoch), total_steps)
  # Under jit XLA may turn count / steps into count * (1 / steps), leaving a
  # linear decay at -1e-8 instead of 0 at its end; a negative LR would flip
  # the last updates.
  return lambda count: jnp.maximum(schedule(count), 0.0)


@SCHEDULES.register("constant")
def _constant(cfg, base_lr, steps_per_epoch, total_steps):
  del cfg, steps_per_epoch, total_steps
  return optax.constant_schedule(base_lr)


@SCHEDULES.register("step")
def _step(cfg, base_lr, steps_per_epoch, total_steps):
  del total_steps
  every = epochs_to_steps(cfg.decay_epochs, steps_per_epoch)
  _require(every >= 1, f"optimizer.schedule.decay_epochs={cfg.decay_epochs} "
           "is shorter than one step")
  return optax.exponential_decay(
      init_value=base_lr, transition_steps=every,
      decay_rate=float(cfg.decay_factor), staircase=True)


@SCHEDULES.register("multistep")
def _multistep(cfg, base_lr, steps_per_epoch, total_steps):
  del total_steps
  boundaries = [epochs_to_steps(m, steps_per_epoch) for m in cfg.milestones]
  _require(len(set(boundaries)) == len(boundaries),
           f"optimizer.schedule.milestones={tuple(cfg.milestones)} fall on "
           "the same step; space them further apart")
  return optax.piecewise_constant_schedule(
      base_lr, {b: float(cfg.decay_factor) for b in boundaries})


def _warmup_steps(cfg, steps_per_epoch: int, total_steps: int,
                  decay: str) -> int:
  warmup = epochs_to_steps(cfg.warmup_epochs, steps_per_epoch)
  _require(warmup < total_steps, "optimizer.schedule.warmup_epochs leaves no "
           f"step for the {decay} decay")
  return warmup


def _up_then_down(base_lr: float, peak: int, total_steps: int
                  ) -> optax.Schedule:
  """Linear 0 -> base_lr over `peak` steps, then linear to 0 at the end."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, peak),
       optax.linear_schedule(base_lr, 0.0, total_steps - peak)], [peak])


@SCHEDULES.register("cosine")
def _cosine(cfg, base_lr, steps_per_epoch, total_steps):
  warmup = _warmup_steps(cfg, steps_per_epoch, total_steps, "cosine")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
      decay_steps=total_steps, end_value=cfg.min_lr_fraction * base_lr)


@SCHEDULES.register("onecycle")
def _onecycle(cfg, base_lr, steps_per_epoch, total_steps):
  peak = epochs_to_steps(cfg.peak_epoch, steps_per_epoch)
  _require(1 <= peak < total_steps,
           f"optimizer.schedule.peak_epoch={cfg.peak_epoch} must fall "
           "strictly inside the run (at least one step on each side)")
  return _up_then_down(base_lr, peak, total_steps)


@SCHEDULES.register("warmup_linear")
def _warmup_linear(cfg, base_lr, steps_per_epoch, total_steps):
  warmup = _warmup_steps(cfg, steps_per_epoch, total_steps, "linear")
  return _up_then_down(base_lr, warmup, total_steps)


def _cyclic(mode: str) -> ScheduleBuilder:
  """Smith 2017, "Cyclical Learning Rates for Training Neural Networks".

  No optax schedule has the triangular2 / exp_range amplitude terms, so the
  paper's formulas are written out:
    cycle = floor(1 + t / (2 s)),  x = |t / s - 2 cycle + 1|,
    lr = lo + (hi - lo) * max(0, 1 - x) * scale(cycle, t).
  """

  def build(cfg, base_lr, steps_per_epoch, total_steps):
    del total_steps
    s = epochs_to_steps(cfg.half_cycle_epochs, steps_per_epoch)
    _require(s >= 1, f"optimizer.schedule.half_cycle_epochs="
             f"{cfg.half_cycle_epochs} is shorter than one step")
    lo = float(cfg.min_lr_fraction) * base_lr
    hi = base_lr
    gamma = float(cfg.gamma)

    def schedule(count):
      # Integer phase arithmetic: 1 - x == (s - |t mod 2s - s|) / s, which is
      # exactly 0 at cycle ends and 1 at peaks (float32 t / s is not).
      t = jnp.asarray(count).astype(jnp.int32)
      cycle = t // (2 * s) + 1
      amp = (s - jnp.abs(t % (2 * s) - s)).astype(jnp.float32) / s
      if mode == "triangular2":
        amp = amp / 2.0 ** (cycle - 1).astype(jnp.float32)
      elif mode == "exp_range":
        # Log-space keeps gamma ** t accurate in float32 for large t.
        amp = amp * jnp.exp(t.astype(jnp.float32) * math.log(gamma))
      return lo + (hi - lo) * amp

    return schedule

  return build


for _mode in ("triangular", "triangular2", "exp_range"):
  SCHEDULES.add(_mode, _cyclic(_mode))
