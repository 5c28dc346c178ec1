"""Every schedule against its closed form, evaluated at every step of a run."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import config as config_lib
from jaxreg import schedules

# Also run against the lowest supported versions (.ci/floors.txt).
pytestmark = pytest.mark.floors

SPE = 10  # steps per epoch
EPOCHS = 24
TOTAL = SPE * EPOCHS
BASE = 0.4
STEPS = np.arange(0, TOTAL + 15)  # a few steps past the end, too


def _cfg(name, **kw):
  c = config_lib.schedule_config()
  c.name = name
  for k, v in kw.items():
    c[k] = v
  return c


def _eval(cfg, base=BASE, spe=SPE, epochs=EPOCHS, steps=STEPS):
  sched = schedules.make_schedule(cfg, base, spe, epochs)
  # optax feeds an int32 count inside jit; evaluate the same way.
  values = jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32))
  return np.asarray(values, np.float64)


def _smith(t, s, lo, hi, mode, gamma=1.0):
  """Smith 2017, section 3.1 (triangular) and the paper's policy variants."""
  t = np.asarray(t, np.float64)
  cycle = np.floor(1 + t / (2 * s))
  x = np.abs(t / s - 2 * cycle + 1)
  amp = np.maximum(0.0, 1 - x)
  if mode == "triangular2":
    amp = amp / 2.0 ** (cycle - 1)
  elif mode == "exp_range":
    amp = amp * gamma ** t
  return lo + (hi - lo) * amp


def ref_constant():
  return _cfg("constant"), np.full(STEPS.shape, BASE)


def ref_step():
  cfg = _cfg("step", decay_epochs=3.0, decay_factor=0.5)
  return cfg, BASE * 0.5 ** np.floor(STEPS / 30)


def ref_multistep():
  cfg = _cfg("multistep", milestones=(5, 12), decay_factor=0.1)
  n = (STEPS >= 50).astype(int) + (STEPS >= 120).astype(int)
  return cfg, BASE * 0.1 ** n


def ref_cosine():
  cfg = _cfg("cosine", min_lr_fraction=0.1)
  lo = 0.1 * BASE
  t = np.minimum(STEPS, TOTAL)
  return cfg, lo + (BASE - lo) * 0.5 * (1 + np.cos(np.pi * t / TOTAL))


def ref_cosine_warmup():
  cfg = _cfg("cosine", warmup_epochs=2.0)
  w = 20
  t = np.minimum(STEPS, TOTAL)
  decay = BASE * 0.5 * (1 + np.cos(np.pi * (t - w) / (TOTAL - w)))
  return cfg, np.where(STEPS < w, BASE * STEPS / w, decay)


def ref_onecycle():
  cfg = _cfg("onecycle", peak_epoch=5.0)
  # DavidNet: PiecewiseLinear([0, 5, 24], [0, lr, 0]) of the fractional epoch.
  return cfg, np.interp(STEPS / SPE, [0, 5, 24], [0, BASE, 0])


def ref_triangular():
  cfg = _cfg("triangular", half_cycle_epochs=2.0, min_lr_fraction=0.25)
  return cfg, _smith(STEPS, 20, 0.25 * BASE, BASE, "triangular")


def ref_triangular2():
  cfg = _cfg("triangular2", half_cycle_epochs=2.0, min_lr_fraction=0.25)
  return cfg, _smith(STEPS, 20, 0.25 * BASE, BASE, "triangular2")


def ref_exp_range():
  cfg = _cfg("exp_range", half_cycle_epochs=2.0, min_lr_fraction=0.25,
             gamma=0.995)
  return cfg, _smith(STEPS, 20, 0.25 * BASE, BASE, "exp_range", 0.995)


def ref_warmup_linear():
  cfg = _cfg("warmup_linear", warmup_epochs=3.0)
  return cfg, np.interp(STEPS, [0, 30, TOTAL], [0, BASE, 0])


REFERENCES = {
    "constant": [ref_constant],
    "step": [ref_step],
    "multistep": [ref_multistep],
    "cosine": [ref_cosine, ref_cosine_warmup],
    "onecycle": [ref_onecycle],
    "triangular": [ref_triangular],
    "triangular2": [ref_triangular2],
    "exp_range": [ref_exp_range],
    "warmup_linear": [ref_warmup_linear],
}
ALL_REFS = [f for fs in REFERENCES.values() for f in fs]


def test_every_registered_schedule_has_a_reference():
  assert sorted(REFERENCES) == schedules.SCHEDULES.names()


@pytest.mark.parametrize("ref", ALL_REFS, ids=lambda f: f.__name__)
def test_matches_closed_form_at_every_step(ref):
  cfg, expected = ref()
  values = _eval(cfg)
  np.testing.assert_allclose(values, expected, rtol=2e-6, atol=1e-7)
  assert (values >= 0).all()


@pytest.mark.parametrize("ref", ALL_REFS, ids=lambda f: f.__name__)
def test_linear_in_base_lr(ref):
  # jaxreg.optim builds the shape at base_lr=1 and injects the scale.
  cfg, _ = ref()
  np.testing.assert_allclose(_eval(cfg, base=BASE), BASE * _eval(cfg, base=1.0),
                             rtol=2e-6, atol=1e-8)


def test_landmarks():
  # The named points of each policy, spelled out.
  v = _eval(ref_onecycle()[0])
  assert v[0] == 0.0 and math.isclose(v[50], BASE, rel_tol=1e-6)
  assert abs(v[TOTAL]) < 1e-7
  v = _eval(ref_triangular2()[0])
  lo = 0.25 * BASE
  assert math.isclose(v[0], lo, rel_tol=1e-6)
  assert math.isclose(v[20], BASE, rel_tol=1e-6)  # first peak
  assert math.isclose(v[40], lo, rel_tol=1e-6)  # end of cycle 1
  assert math.isclose(v[60], lo + (BASE - lo) / 2, rel_tol=1e-6)  # halved
  v = _eval(ref_exp_range()[0])
  assert math.isclose(v[60], lo + (BASE - lo) * 0.995 ** 60, rel_tol=1e-5)
  v = _eval(ref_cosine()[0])
  assert math.isclose(v[0], BASE, rel_tol=1e-6)
  assert math.isclose(v[TOTAL], 0.1 * BASE, rel_tol=1e-5)
  v = _eval(ref_multistep()[0])
  assert math.isclose(v[49], BASE, rel_tol=1e-6)
  assert math.isclose(v[50], 0.1 * BASE, rel_tol=1e-6)


def test_fractional_epochs_round_to_steps():
  # 0.45 epochs at 10 steps/epoch is a 5-step half cycle (halves round up).
  cfg = _cfg("triangular", half_cycle_epochs=0.45)
  np.testing.assert_allclose(_eval(cfg), _smith(STEPS, 5, 0.0, BASE,
                                                 "triangular"),
                             rtol=2e-6, atol=1e-7)


BAD = [
    (dict(name="cosinus"), "valid choices: constant, cosine, exp_range"),
    (dict(name="cosine", warmup_epochs=-1.0), "warmup_epochs must be >= 0"),
    (dict(name="step", warmup_epochs=1.0), "only supported by cosine"),
    (dict(name="cosine", warmup_epochs=24.0), "shorter than the run"),
    (dict(name="cosine", min_lr_fraction=-0.1), "min_lr_fraction"),
    (dict(name="triangular", min_lr_fraction=1.5), "min_lr_fraction"),
    (dict(name="step", decay_epochs=0.0), "decay_epochs must be > 0"),
    (dict(name="step", decay_epochs=0.01), "shorter than one step"),
    (dict(name="step", decay_factor=0.0), "decay_factor"),
    (dict(name="multistep", decay_factor=2.0), "decay_factor"),
    (dict(name="multistep", milestones=(10, 5)), "strictly increasing"),
    (dict(name="multistep", milestones=(-1, 5)), "positive"),
    (dict(name="multistep", milestones=()), "at least one"),
    (dict(name="multistep", milestones=(5.0, 5.04)), "same step"),
    (dict(name="onecycle", peak_epoch=24.0), "peak_epoch"),
    (dict(name="onecycle", peak_epoch=-2.0), "peak_epoch must be > 0"),
    (dict(name="triangular2", half_cycle_epochs=0.0), "half_cycle_epochs"),
    (dict(name="exp_range", gamma=1.5), "gamma"),
    (dict(name="exp_range", gamma=0.0), "gamma"),
    (dict(name="warmup_linear", warmup_epochs=30.0), "shorter than the run"),
]


@pytest.mark.parametrize("overrides,message", BAD,
                         ids=[f"{i}" for i in range(len(BAD))])
def test_bad_options_refused_at_build_time(overrides, message):
  cfg = _cfg(**overrides)
  with pytest.raises(ValueError, match=message):
    schedules.make_schedule(cfg, BASE, SPE, EPOCHS)


@pytest.mark.parametrize("base,spe,epochs,message", [
    (0.0, SPE, EPOCHS, "base_lr must be > 0"),
    (BASE, 0, EPOCHS, "steps_per_epoch"),
    (BASE, 2.5, EPOCHS, "steps_per_epoch"),
    (BASE, SPE, 0, "num_epochs must be > 0"),
    (BASE, SPE, 0.01, "no optimizer step"),
])
def test_bad_run_length_refused(base, spe, epochs, message):
  with pytest.raises(ValueError, match=message):
    schedules.make_schedule(_cfg("constant"), base, spe, epochs)


def test_default_config_builds_every_schedule():
  for name in schedules.SCHEDULES.names():
    cfg = config_lib.schedule_config()
    cfg.name = name
    if name in ("cosine", "warmup_linear"):
      cfg.warmup_epochs = 1.0
    schedules.make_schedule(cfg, BASE, SPE, EPOCHS)
