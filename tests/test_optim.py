"""The optimizer chain against hand-computed float64 updates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import config as config_lib
from jaxreg import optim

# Also run against the lowest supported versions (.ci/floors.txt).
pytestmark = pytest.mark.floors

LR = 0.1

# Leaf paths -> shapes, in the layout models produce ("/"-joined paths).
SHAPES = {
    "stem/conv/kernel": (3, 3, 2, 4),
    "stem/norm/scale": (4,),
    "stem/norm/bias": (4,),
    "stem/norm/gate": (4,),
    "block0/conv1x1/kernel": (1, 1, 1, 4),  # fan-in 1: per-unit norm is |w|
    "block0/dense/kernel": (4, 6),
    "block0/dense/bias": (6,),
    "classifier/kernel": (6, 3),
    "classifier/bias": (3,),
}
KERNELS = [p for p in SHAPES if p.endswith("kernel")]


def _nest(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return tree


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    out.update(_flat(v, p) if isinstance(v, dict) else {p: np.asarray(v)})
  return out


def _params(seed=0):
  rng = np.random.default_rng(seed)
  flat = {p: rng.normal(size=s) for p, s in SHAPES.items()}
  flat["stem/norm/gate"] = rng.uniform(0.2, 0.8, size=4)
  flat["block0/dense/bias"][:] = 0.0  # zero-init: eps and sign(0) matter
  flat["stem/conv/kernel"][0, 0, 0, 0] = 0.0
  return flat


def _grads(seed=1, spread=True):
  rng = np.random.default_rng(seed)
  out = {}
  for p, s in SHAPES.items():
    g = rng.normal(size=s)
    if spread:
      # Per output unit magnitudes from 1e-4 to 1e2 so AGC clips some units
      # and leaves others.
      g = g * 10.0 ** rng.uniform(-4, 2, size=s[-1:])
    out[p] = g
  return out


def _cfg(**kw):
  c = config_lib.optimizer_config()
  c.lr = LR
  c.momentum = 0.0
  for k, v in kw.items():
    if "." in k:
      section, key = k.split(".")
      c[section][key] = v
    else:
      c[k] = v
  return c


def _run(cfg, params, grads_seq, steps_per_epoch=1, num_epochs=10):
  """Applies the chain to float32 params; returns flat params after each step."""
  tx = optim.make_optimizer(cfg, steps_per_epoch, num_epochs)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _nest(params))
  state = tx.init(p)
  out = []
  for g in grads_seq:
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _nest(g))
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    out.append(_flat(p))
  return out


def _close(got, want, rtol=2e-5, atol=1e-6):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol,
                               err_msg=k)


# --- masks ------------------------------------------------------------------

def test_path_mask_default_selects_conv_and_dense_kernels():
  mask = _flat(optim.path_mask(_nest(_params()), config_lib.KERNEL_REGEX))
  assert {k for k, v in mask.items() if v} == set(KERNELS)
  cls = _flat(optim.path_mask(_nest(_params()),
                              config_lib.optimizer_config().agc_exclude))
  assert {k for k, v in cls.items() if v} == {"classifier/kernel",
                                              "classifier/bias"}


def test_path_mask_on_a_flax_param_tree():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), name="conv1")(x)
      x = nn.GroupNorm(num_groups=2, name="norm1")(x)
      return nn.Dense(3, name="classifier")(x.mean((1, 2)))

  params = Net().init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
  flat = _flat(optim.path_mask(params, config_lib.KERNEL_REGEX))
  assert {k for k, v in flat.items() if v} == {"conv1/kernel",
                                               "classifier/kernel"}
  assert set(flat) == {"conv1/kernel", "conv1/bias", "norm1/scale",
                       "norm1/bias", "classifier/kernel", "classifier/bias"}


# --- AGC --------------------------------------------------------------------

def _agc_ref(g, w, clip, eps):
  """NFNets AGC in float64: per output unit (last axis), norms over the rest;
  vectors are one unit."""
  axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else None
  gn = np.sqrt((g ** 2).sum(axis=axes, keepdims=True))
  wn = np.maximum(np.sqrt((w ** 2).sum(axis=axes, keepdims=True)), eps)
  return np.where(gn / wn > clip, clip * wn / gn * g, g)


@pytest.mark.parametrize("clip", [0.01, 0.16])
def test_agc_matches_nfnets_formula(clip):
  params, grads = _params(), _grads()
  (after,) = _run(_cfg(agc_clip=clip), params, [grads])
  want, n_clipped, n_kept = {}, 0, 0
  for k in SHAPES:
    if k.startswith("classifier/"):
      want[k] = params[k] - LR * grads[k]  # untouched by AGC
      continue
    g = _agc_ref(grads[k], params[k], clip, 1e-3)
    changed = ~np.isclose(g, grads[k], rtol=1e-9, atol=0).all(
        axis=tuple(range(g.ndim - 1)) if g.ndim > 1 else None)
    n_clipped += int(np.sum(changed))
    n_kept += int(np.sum(~changed))
    want[k] = params[k] - LR * g
  assert n_clipped >= 3 and n_kept >= 3  # both branches exercised
  _close(after, want, rtol=1e-5, atol=1e-6)


def test_agc_agrees_with_optax_on_standard_shapes():
  rng = np.random.default_rng(3)
  p = {"conv": rng.normal(size=(3, 3, 4, 8)), "dense": rng.normal(size=(8, 5)),
       "bias": rng.normal(size=(5,))}
  g = {k: 10 * rng.normal(size=v.shape) for k, v in p.items()}
  p, g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (p, g))
  ours, _ = optim.adaptive_grad_clip(0.05).update(g, (), p)
  ref, _ = optax.adaptive_grad_clip(0.05).update(g, (), p)
  for k in p:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6)


# --- L1 and weight decay ------------------------------------------------------

def test_l1_one_step_on_kernels_only():
  params, grads = _params(), _grads(spread=False)
  (after,) = _run(_cfg(l1=0.01), params, [grads])
  want = {}
  for k in SHAPES:
    pen = 0.01 * np.sign(params[k]) if k in KERNELS else 0.0
    want[k] = params[k] - LR * (grads[k] + pen)
  assert after["stem/conv/kernel"][0, 0, 0, 0] == pytest.approx(
      -LR * grads["stem/conv/kernel"][0, 0, 0, 0], rel=1e-5)  # sign(0) = 0
  _close(after, want)


def test_coupled_weight_decay_two_steps_with_momentum():
  # PyTorch SGD: d = g + wd * w; b = m * b + d; w -= lr * b.
  wd, m = 0.05, 0.9
  params, g1, g2 = _params(), _grads(1, False), _grads(2, False)
  s1, s2 = _run(_cfg(weight_decay=wd, momentum=m), params, [g1, g2])
  w, b = dict(params), {k: 0.0 for k in SHAPES}
  for g, got in ((g1, s1), (g2, s2)):
    for k in SHAPES:
      d = g[k] + (wd * w[k] if k in KERNELS else 0.0)
      b[k] = m * b[k] + d
      w[k] = w[k] - LR * b[k]
    _close(got, w)


def test_decoupled_weight_decay_follows_scheduled_lr():
  # SGDW: b = m * b + g; w <- w - lr_t * b - lr_t * wd * w, with lr_t halving
  # every step (step schedule, one step per epoch).
  wd, m = 0.05, 0.9
  cfg = _cfg(weight_decay=wd, momentum=m, decoupled_weight_decay=True,
             **{"schedule.name": "step", "schedule.decay_epochs": 1.0,
                "schedule.decay_factor": 0.5})
  params, g1, g2 = _params(), _grads(1, False), _grads(2, False)
  states = _run(cfg, params, [g1, g2])
  w, b = dict(params), {k: 0.0 for k in SHAPES}
  for t, (g, got) in enumerate(zip((g1, g2), states)):
    lr = LR * 0.5 ** t
    for k in SHAPES:
      b[k] = m * b[k] + g[k]
      w[k] = w[k] - lr * b[k] - (lr * wd * w[k] if k in KERNELS else 0.0)
    _close(got, w)


def test_adamw_decouples_weight_decay():
  wd, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
  params, g1, g2 = _params(), _grads(1, False), _grads(2, False)
  states = _run(_cfg(name="adamw", weight_decay=wd), params, [g1, g2])
  w = dict(params)
  mu, nu = {k: 0.0 for k in SHAPES}, {k: 0.0 for k in SHAPES}
  for t, (g, got) in enumerate(zip((g1, g2), states), start=1):
    for k in SHAPES:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      step = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
      w[k] = w[k] - LR * (step + (wd * w[k] if k in KERNELS else 0.0))
    _close(got, w, rtol=1e-4, atol=1e-5)


def test_custom_mask_extends_decay_to_norm_scales():
  wd = 0.05
  params, grads = _params(), _grads(spread=False)
  cfg = _cfg(weight_decay=wd, weight_decay_mask=r"(^|/)(kernel|scale)$")
  (after,) = _run(cfg, params, [grads])
  decayed = set(KERNELS) | {"stem/norm/scale"}
  want = {k: params[k] - LR * (grads[k] + (wd * params[k] if k in decayed
                                           else 0.0)) for k in SHAPES}
  _close(after, want)


def test_norm_params_and_gate_get_no_penalty_by_default():
  params, grads = _params(), _grads(spread=False)
  (after,) = _run(_cfg(weight_decay=0.3, l1=0.2), params, [grads])
  for k in SHAPES:
    if k not in KERNELS:
      np.testing.assert_allclose(after[k], params[k] - LR * grads[k],
                                 rtol=1e-6, atol=1e-7, err_msg=k)
    else:
      assert not np.allclose(after[k], params[k] - LR * grads[k]), k


# --- momentum ---------------------------------------------------------------

def test_nesterov_matches_pytorch():
  # torch.optim.SGD(nesterov=True): b = m * b + g; d = g + m * b; w -= lr * d.
  m = 0.9
  params = _params()
  gs = [_grads(s, False) for s in (1, 2, 3)]
  states = _run(_cfg(momentum=m, nesterov=True), params, gs)
  w, b = dict(params), {k: 0.0 for k in SHAPES}
  for g, got in zip(gs, states):
    for k in SHAPES:
      b[k] = m * b[k] + g[k]
      w[k] = w[k] - LR * (g[k] + m * b[k])
    _close(got, w)


def test_scheduled_lr_is_applied_and_reported():
  cfg = _cfg(**{"schedule.name": "onecycle", "schedule.peak_epoch": 2.0})
  params = {k: np.ones(s) for k, s in SHAPES.items()}
  ones = {k: np.ones(s) for k, s in SHAPES.items()}
  states = _run(cfg, params, [ones] * 5, steps_per_epoch=2, num_epochs=4)
  lr = optim.lr_schedule(cfg, 2, 4)
  w = 1.0
  for t, got in enumerate(states):
    w -= float(lr(t))
    np.testing.assert_allclose(got["stem/conv/kernel"], w, rtol=1e-6)
  assert float(lr(4)) == pytest.approx(LR)  # peak at epoch 2 = step 4


# --- clipping and the gate ----------------------------------------------------

def test_global_norm_clipping():
  params, grads = _params(), _grads(spread=False)
  norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
  (after,) = _run(_cfg(grad_clip_norm=1.0), params, [grads])
  _close(after, {k: params[k] - LR * grads[k] / norm for k in SHAPES})


def test_gate_lr_multiplier():
  params, grads = _params(), _grads(spread=False)
  (after,) = _run(_cfg(gate_lr_multiplier=10.0), params, [grads])
  want = {k: params[k] - LR * grads[k] * (10.0 if k.endswith("gate") else 1.0)
          for k in SHAPES}
  _close(after, want)


def test_project_params_clips_gates_only():
  tree = {"a": {"gate": jnp.array([-0.5, 0.25, 1.75]),
                "scale": jnp.array([-0.5, 0.25, 1.75])},
          "gate_kernel": jnp.array([2.0])}
  out = optim.project_params(tree)
  np.testing.assert_array_equal(out["a"]["gate"], [0.0, 0.25, 1.0])
  np.testing.assert_array_equal(out["a"]["scale"], [-0.5, 0.25, 1.75])
  np.testing.assert_array_equal(out["gate_kernel"], [2.0])
  no_gates = {"k": jnp.array([5.0, -5.0])}
  np.testing.assert_array_equal(optim.project_params(no_gates)["k"],
                                [5.0, -5.0])


# --- injected hyperparameters ---------------------------------------------------

def test_injected_hyperparams_change_without_recompiling():
  cfg = _cfg(weight_decay=0.01, l1=1e-3, agc_clip=1.0, momentum=0.5)
  tx = optim.make_optimizer(cfg, 1, 10)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _nest(_params()))
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                   _nest(_grads(spread=False)))
  state = tx.init(p)
  assert set(optim.get_hyperparams(state)) == {
      "learning_rate", "momentum", "weight_decay", "l1", "agc_clip"}

  @jax.jit
  def step(state):
    return tx.update(g, state, p)

  step(state)
  new = optim.set_hyperparams(state, weight_decay=0.2, learning_rate=0.3)
  u, _ = step(new)
  assert step._cache_size() == 1
  # Same update as a chain built with those values from the start.
  tx2 = optim.make_optimizer(_cfg(weight_decay=0.2, l1=1e-3, agc_clip=1.0,
                                  momentum=0.5, lr=0.3), 1, 10)
  u2, _ = tx2.update(g, tx2.init(p), p)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_disabled_terms_are_not_injected():
  tx = optim.make_optimizer(_cfg(), 1, 10)
  state = tx.init(_nest({k: jnp.zeros(s) for k, s in SHAPES.items()}))
  assert set(optim.get_hyperparams(state)) == {"learning_rate"}
  with pytest.raises(ValueError, match="injected: learning_rate"):
    optim.set_hyperparams(state, l1=1e-4)


# --- validation ------------------------------------------------------------------

BAD = [
    (dict(agc_clip=0.0), "agc_clip must be > 0"),
    (dict(agc_clip=-0.01), "agc_clip must be > 0"),
    (dict(agc_eps=0.0), "agc_eps must be > 0"),
    (dict(l1=-1e-4), "l1 must be >= 0"),
    (dict(weight_decay=-5e-4), "weight_decay must be >= 0"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-0.1), "lr must be > 0"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
    (dict(grad_clip_norm=0.0), "grad_clip_norm must be > 0"),
    (dict(name="sgdw"), "valid choices: adam, adamw, sgd"),
    (dict(**{"schedule.name": "cosinus"}), "unknown schedule 'cosinus'"),
    (dict(**{"schedule.warmup_epochs": -1.0}), "warmup_epochs"),
    (dict(gate_lr_multiplier=-1.0), "gate_lr_multiplier"),
    (dict(name="adam", b2=1.0), "b2 must be in"),
    (dict(name="adam", nesterov=True), "nesterov applies to sgd only"),
    (dict(nesterov=True, momentum=0.0), "nesterov needs momentum > 0"),
    (dict(weight_decay_mask="(kernel"), "not a valid regular expression"),
]


@pytest.mark.parametrize("overrides,message", BAD,
                         ids=[str(i) for i in range(len(BAD))])
def test_validation_errors(overrides, message):
  cfg = _cfg(**overrides)
  with pytest.raises(ValueError, match=message):
    optim.validate(cfg)
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(cfg, 10, 5)


def test_default_config_is_valid_and_complete():
  cfg = config_lib.optimizer_config()
  optim.validate(cfg)
  for key in ("name", "lr", "momentum", "nesterov", "weight_decay",
              "decoupled_weight_decay", "weight_decay_mask", "l1", "l1_mask",
              "agc_clip", "agc_eps", "agc_exclude", "grad_clip_norm",
              "gate_lr_multiplier", "b1", "b2", "eps", "schedule"):
    assert key in cfg, key
  assert cfg.agc_clip is None and cfg.grad_clip_norm is None
  # A locked config still takes an override of a placeholder from the CLI.
  cfg.lock()
  cfg.agc_clip = 0.01
