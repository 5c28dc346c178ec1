"""Every norm against float64 NumPy implementations of its formula."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import config as config_lib
from jaxreg import norms

# Also run against the lowest supported versions (.ci/floors.txt).
pytestmark = pytest.mark.floors

SHAPES = [(8, 5, 5, 4), (16, 3, 7, 6), (4, 8)]
EPS = 1e-5

# (name, options). Virtual batch sizes 2 and 4 divide every batch in SHAPES.
CASES = [
    ("batch", {}),
    ("batch", {"momentum": 0.5, "epsilon": 1e-3}),
    ("batch", {"virtual_batch_size": 2}),
    ("batch", {"unbiased_running_var": True}),
    ("batch", {"virtual_batch_size": 4, "unbiased_running_var": True}),
    ("batch_flax", {}),
    ("batch_flax", {"momentum": 0.5, "epsilon": 1e-3}),
    ("group", {}),
    ("group", {"group_size": 2, "epsilon": 1e-3}),
    ("layer", {}),
    ("instance", {}),
    ("batch_instance", {}),
    ("batch_instance", {"virtual_batch_size": 2, "unbiased_running_var": True,
                        "momentum": 0.8}),
    ("none", {}),
]
SPATIAL_ONLY = {"instance", "batch_instance"}  # need [N, H, W, C]


def _cases():
  for name, kw in CASES:
    for shape in SHAPES:
      if len(shape) == 2 and name in SPATIAL_ONLY:
        continue
      opts = "-".join(f"{k}={v}" for k, v in kw.items())
      dims = "x".join(map(str, shape))
      yield pytest.param(name, kw, shape, id=f"{name}-{opts}-{dims}")


def _input(shape, seed):
  """Per-channel offset and spread, so |mean| ~ std as after a ReLU."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  offset = rng.uniform(-2.0, 2.0, c)
  spread = rng.uniform(0.5, 2.0, c)
  return (offset + spread * rng.standard_normal(shape)).astype(np.float32)


def _random_variables(variables, seed):
  """Non-trivial affine params, gate in (0, 1) and running stats."""
  rng = np.random.default_rng(seed)
  out = {}
  if "params" in variables:
    p = {}
    for k, v in variables["params"].items():
      c = v.shape
      if k == "scale":
        p[k] = 1.0 + 0.5 * rng.standard_normal(c)
      elif k == "bias":
        p[k] = rng.standard_normal(c)
      elif k == "gate":
        p[k] = rng.uniform(0.1, 0.9, c)
      else:
        raise AssertionError(f"unexpected param {k}")
    out["params"] = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  if "batch_stats" in variables:
    c = variables["batch_stats"]["mean"].shape
    out["batch_stats"] = {
        "mean": jnp.asarray(rng.uniform(-2, 2, c), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 3.0, c), jnp.float32)}
  assert set(out) == set(variables)
  return out


# ---------------------------------------------------------------- references


def ref_batch_stats(x, groups=1):
  """Per-virtual-batch mean and biased variance, shape [groups, 1.., C]."""
  xg = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
  axes = tuple(range(1, xg.ndim - 1))
  mean = xg.mean(axes, keepdims=True)
  var = ((xg - mean) ** 2).mean(axes, keepdims=True)
  return xg, mean, var


def ref_bn(x, eps, groups=1):
  xg, mean, var = ref_batch_stats(x, groups)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)


def ref_running(mean0, var0, x, momentum, groups=1, unbiased=False):
  xg, mean, var = ref_batch_stats(x, groups)
  c = x.shape[-1]
  n = xg[0].size // c
  if unbiased:
    var = var * n / (n - 1)
  return (momentum * mean0 + (1 - momentum) * mean.reshape(groups, c).mean(0),
          momentum * var0 + (1 - momentum) * var.reshape(groups, c).mean(0))


def ref_in(x, eps):
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def ref_gn(x, num_groups, eps):
  n, c = x.shape[0], x.shape[-1]
  xr = x.reshape(n, -1, num_groups, c // num_groups)
  mean = xr.mean((1, 3), keepdims=True)
  var = ((xr - mean) ** 2).mean((1, 3), keepdims=True)
  return ((xr - mean) / np.sqrt(var + eps)).reshape(x.shape)


def reference(name, kw, x, variables, train):
  """float64 output and, for running-stat norms in training, new stats."""
  x = np.asarray(x, np.float64)
  v = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  eps = kw.get("epsilon", EPS)
  if name == "none":
    return x, None
  p = v["params"]
  c = x.shape[-1]
  stats = None
  if name in norms.KEEPS_RUNNING_STATS:
    groups = x.shape[0] // kw.get("virtual_batch_size", x.shape[0])
    if train:
      y_bn = ref_bn(x, eps, groups)
      stats = ref_running(v["batch_stats"]["mean"], v["batch_stats"]["var"], x,
                          kw.get("momentum", 0.9), groups,
                          kw.get("unbiased_running_var", False))
    else:
      y_bn = ((x - v["batch_stats"]["mean"])
              / np.sqrt(v["batch_stats"]["var"] + eps))
    if name == "batch_instance":
      g = p["gate"]
      y = g * y_bn + (1 - g) * ref_in(x, eps)
    else:
      y = y_bn
  elif name == "group":
    groups = (c // kw["group_size"]) if "group_size" in kw else kw.get(
        "num_groups", 2)
    y = ref_gn(x, groups, eps)
  elif name == "layer":
    # Independent of GroupNorm: each sample over all its values at once.
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
  elif name == "instance":
    y = ref_in(x, eps)
  else:
    raise AssertionError(name)
  return y * p["scale"] + p["bias"], stats


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def _build(name, kw, x, seed=0):
  module = norms.make_norm(name, **kw)()
  variables = module.init(jax.random.key(0), jnp.asarray(x), train=True)
  return module, _random_variables(variables, seed)


def _step(module, variables, x):
  """One training forward pass; returns output and updated variables."""
  y, upd = module.apply(variables, jnp.asarray(x), train=True,
                        mutable=["batch_stats"])
  return y, {**variables, **upd}


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("name,kw,shape", list(_cases()))
def test_matches_float64_reference(name, kw, shape):
  x1, x2 = _input(shape, 1), _input(shape, 2)
  module, v0 = _build(name, kw, x1, seed=3)

  # Train mode: output from batch statistics and two running-stat updates.
  y1, v1 = _step(module, v0, x1)
  want1, stats1 = reference(name, kw, x1, v0, train=True)
  assert y1.dtype == jnp.float32 and y1.shape == shape
  assert rel_err(y1, want1) < 1e-5
  y2, v2 = _step(module, v1, x2)
  # Step two starts from the float64 reference of step one, not the module's.
  ref_v1 = v0 if stats1 is None else {
      **v0, "batch_stats": {"mean": stats1[0], "var": stats1[1]}}
  want2, stats2 = reference(name, kw, x2, ref_v1, train=True)
  assert rel_err(y2, want2) < 1e-5
  if name in norms.KEEPS_RUNNING_STATS:
    for got, want in ((v1, stats1), (v2, stats2)):
      np.testing.assert_allclose(got["batch_stats"]["mean"], want[0],
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got["batch_stats"]["var"], want[1],
                                 rtol=1e-5, atol=1e-6)
  else:
    assert "batch_stats" not in v2

  # Eval mode: running statistics (random ones here), nothing updated.
  y_eval = module.apply(v2, jnp.asarray(x1), train=False)
  want_eval, _ = reference(name, kw, x1, v2, train=False)
  assert rel_err(y_eval, want_eval) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_virtual_batch_equals_separate_batches(shape):
  """Ghost BN on 2 groups == BN on each half; running stats = their mean."""
  x = _input(shape, 4)
  half = shape[0] // 2
  ghost, v = _build("batch", {"virtual_batch_size": half}, x)
  whole = norms.make_norm("batch")()
  y, v_ghost = _step(ghost, v, x)
  ya, va = _step(whole, v, x[:half])
  yb, vb = _step(whole, v, x[half:])
  np.testing.assert_allclose(y, np.concatenate([ya, yb]), rtol=1e-6, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_allclose(
        v_ghost["batch_stats"][k],
        (va["batch_stats"][k] + vb["batch_stats"][k]) / 2, rtol=1e-6)
  # Statistics per group differ from whole-batch ones on this input.
  y_whole, _ = _step(whole, v, x)
  assert rel_err(y, y_whole) > 1e-3


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.5, "epsilon": 1e-3}])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_agrees_with_batch_flax(kw, shape):
  x1, x2 = _input(shape, 5), _input(shape, 6)
  own, v = _build("batch", kw, x1)
  flax_bn = norms.make_norm("batch_flax", **kw)()
  assert jax.tree.map(jnp.shape, flax_bn.init(
      jax.random.key(0), x1, train=True)) == jax.tree.map(jnp.shape, v)
  vo, vf = v, v
  for x in (x1, x2):
    yo, vo = _step(own, vo, x)
    yf, vf = _step(flax_bn, vf, x)
    assert rel_err(yo, yf) < 1e-5
    for k in ("mean", "var"):
      np.testing.assert_allclose(vo["batch_stats"][k], vf["batch_stats"][k],
                                 rtol=1e-5, atol=1e-6)
  assert rel_err(own.apply(vo, x1, train=False),
                 flax_bn.apply(vf, x1, train=False)) < 1e-5

  # Gradients through the batch statistics agree too.
  def loss(params, module):
    y, _ = module.apply({**v, "params": params}, x1, train=True,
                        mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))
  go = jax.grad(loss)(v["params"], own)
  gf = jax.grad(loss)(v["params"], flax_bn)
  for k in ("scale", "bias"):
    assert rel_err(go[k], gf[k]) < 1e-4


@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 4,
                                     "unbiased_running_var": True}])
def test_batch_instance_gate_limits(kw):
  """gate = 1 is batch norm (incl. running stats), gate = 0 instance norm."""
  x = _input(SHAPES[0], 7)
  bin_, v = _build("batch_instance", kw, x)
  bn = norms.make_norm("batch", **kw)()
  inn = norms.make_norm("instance")()
  affine = {k: v["params"][k] for k in ("scale", "bias")}
  for gate, other, other_v in (
      (1.0, bn, {**v, "params": affine}),
      (0.0, inn, {"params": affine})):
    vg = {**v, "params": {**v["params"], "gate": jnp.full_like(
        v["params"]["gate"], gate)}}
    y, v_new = _step(bin_, vg, x)
    y_other, other_new = other.apply(other_v, x, train=True,
                                     mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_other, rtol=1e-6, atol=1e-6)
    if gate == 1.0:
      for k in ("mean", "var"):
        np.testing.assert_allclose(v_new["batch_stats"][k],
                                   other_new["batch_stats"][k], rtol=1e-6)
    np.testing.assert_allclose(bin_.apply(vg, x, train=False),
                               other.apply(other_v, x, train=False),
                               rtol=1e-6, atol=1e-6)


def test_batch_instance_gate_starts_at_one():
  x = _input(SHAPES[0], 8)
  v = norms.make_norm("batch_instance")().init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["params"]["gate"], 1.0)


@pytest.mark.parametrize("name", ["batch", "batch_instance", "group", "layer",
                                  "instance"])
def test_bfloat16_input_float32_statistics(name):
  x = _input(SHAPES[0], 9)
  xb = jnp.asarray(x, jnp.bfloat16)
  module, v = _build(name, {}, x)
  y, v_new = _step(module, v, xb)
  assert y.dtype == jnp.bfloat16
  want, stats = reference(name, {}, np.asarray(xb.astype(jnp.float32)), v,
                          train=True)
  assert rel_err(y, want) < 1e-2  # bfloat16 output rounding
  if stats is not None:
    # Statistics of the bf16 values, accurate to float32, not to bfloat16.
    assert v_new["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(v_new["batch_stats"]["mean"], stats[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_new["batch_stats"]["var"], stats[1],
                               rtol=1e-5, atol=1e-6)


def test_jit_matches_eager():
  kw = {"virtual_batch_size": 4, "unbiased_running_var": True}
  x = _input(SHAPES[1], 10)
  module, v = _build("batch_instance", kw, x)
  step = jax.jit(lambda v, x: _step(module, v, x))
  y_jit, v_jit = step(v, x)
  y, v_eager = _step(module, v, x)
  np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(v_jit["batch_stats"][k],
                               v_eager["batch_stats"][k], rtol=1e-6)


@pytest.mark.parametrize("name", norms.NORMS.names())
def test_variables_layout(name):
  x = _input(SHAPES[0], 11)
  v = norms.make_norm(name)().init(jax.random.key(0), x, train=True)
  assert ("batch_stats" in v) == (name in norms.KEEPS_RUNNING_STATS)
  if name in norms.KEEPS_RUNNING_STATS:
    assert set(v["batch_stats"]) == {"mean", "var"}
    # init does not move the running statistics.
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(v["batch_stats"]["var"], 1.0)
  want = {"none": set(), "batch_instance": {"scale", "bias", "gate"}}.get(
      name, {"scale", "bias"})
  assert set(v.get("params", {})) == want
  for p in v.get("params", {}).values():
    assert p.shape == (4,) and p.dtype == jnp.float32


# -------------------------------------------------------------------- errors


def test_group_divisibility_error():
  x = _input((2, 3, 3, 12), 12)
  module = norms.make_norm("group", num_groups=5)()
  with pytest.raises(ValueError) as e:
    module.init(jax.random.key(0), x)
  msg = str(e.value)
  assert "num_groups=5" in msg and "12 channels" in msg
  assert "1, 2, 3, 4, 6, 12" in msg
  assert "config.model.norm_kwargs.num_groups" in msg
  module = norms.make_norm("group", group_size=5)()
  with pytest.raises(ValueError, match=r"norm_kwargs\.group_size.*1, 2, 3, 4"):
    module.init(jax.random.key(0), x)


@pytest.mark.parametrize("kw,match", [
    ({"num_groups": 2, "group_size": 2}, "not both"),
    ({"num_groups": 0}, "num_groups must be a positive integer"),
    ({"group_size": 1.5}, "group_size must be a positive integer"),
    ({"epsilon": 0.0}, "epsilon must be a positive"),
])
def test_group_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    norms.make_norm("group", **kw)


@pytest.mark.parametrize("name,kw,match", [
    ("batch", {"momentum": 1.5}, "momentum must be in"),
    ("batch_flax", {"momentum": -0.1}, "momentum must be in"),
    ("batch", {"virtual_batch_size": 0}, "virtual_batch_size must be"),
    ("batch_instance", {"unbiased_running_var": 1}, "True or False"),
    ("layer", {"epsilon": -1e-5}, "epsilon must be"),
])
def test_bad_option_values(name, kw, match):
  with pytest.raises(ValueError, match=match):
    norms.make_norm(name, **kw)


@pytest.mark.parametrize("name", ["batch", "batch_instance"])
def test_virtual_batch_must_divide(name):
  module = norms.make_norm(name, virtual_batch_size=3)()
  with pytest.raises(ValueError,
                     match=r"batch of 8 .*virtual_batch_size.*1, 2, 4, 8"):
    module.init(jax.random.key(0), _input(SHAPES[0], 13), train=True)


@pytest.mark.parametrize("name", sorted(SPATIAL_ONLY))
def test_spatial_norms_refuse_flat_input(name):
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    norms.make_norm(name)().init(jax.random.key(0), _input((4, 8), 14))


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as e:
    norms.make_norm("batchnorm")
  msg = str(e.value)
  assert "'batchnorm'" in msg
  for name in ("batch", "batch_flax", "group", "layer", "instance",
               "batch_instance", "none"):
    assert name in msg


def test_unknown_option_refused():
  with pytest.raises(ValueError, match=r"'layer' does not take num_groups; "
                                       r"it accepts: epsilon"):
    norms.make_norm("layer", num_groups=2)
  with pytest.raises(ValueError, match="no options"):
    norms.make_norm("none", epsilon=1e-5)


def test_norm_kwargs_config():
  cfg = config_lib.norm_kwargs_config()
  options = set().union(*(norms.OPTIONS[n] for n in norms.NORMS.names()))
  assert set(cfg) == options == {
      "num_groups", "group_size", "momentum", "epsilon",
      "virtual_batch_size", "unbiased_running_var"}
  assert all(cfg[k] is None for k in cfg)
  for name in norms.NORMS.names():  # all unset: every norm builds
    assert norms.make_norm_from_config(name, cfg).keywords == {}
  cfg.num_groups = 4
  assert norms.make_norm_from_config("group", cfg).keywords == {
      "num_groups": 4}
  with pytest.raises(ValueError, match=(
      r"'batch' does not take num_groups; it accepts: epsilon, momentum, "
      r"unbiased_running_var, virtual_batch_size")):
    norms.make_norm_from_config("batch", cfg)
  cfg.num_groups = None
  cfg.group_size = 2
  factory = norms.make_norm_from_config("group", cfg)
  assert factory.keywords == {"group_size": 2, "num_groups": None}
  assert norms.make_norm_from_config("batch", None).keywords == {}
  assert norms.make_norm_from_config(
      "batch", {"momentum": 0.8, "epsilon": None}).keywords == {
          "momentum": 0.8}


# ----------------------------------------------------------------- gradients


def _numeric_grad(f, x, h=1e-5):
  """Central differences of the float64 function f at x, element by
  element."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  flat, gf = x.reshape(-1), g.reshape(-1)
  for i in range(flat.size):
    old = flat[i]
    flat[i] = old + h
    up = f(x)
    flat[i] = old - h
    down = f(x)
    flat[i] = old
    gf[i] = (up - down) / (2 * h)
  return g


@pytest.mark.parametrize("name,kw,shape", [
    ("batch", {}, (8, 3, 3, 4)), ("batch", {}, (8, 6)),
    ("batch", {"virtual_batch_size": 2, "epsilon": 1e-3}, (8, 3, 3, 4)),
    ("batch", {"virtual_batch_size": 2, "epsilon": 1e-3}, (8, 6)),
    ("batch_instance", {"virtual_batch_size": 4}, (8, 3, 3, 4))])
def test_train_gradients_match_float64_finite_differences(name, kw, shape):
  x = _input(shape, 11)
  module, v = _build(name, kw, x, seed=12)
  w = np.random.default_rng(13).standard_normal(shape)

  def loss(params, x):
    y, _ = module.apply({**v, "params": params}, x, train=True,
                        mutable=["batch_stats"])
    return jnp.sum(jnp.asarray(w, jnp.float32) * y)

  g_params, g_x = jax.grad(loss, argnums=(0, 1))(v["params"], jnp.asarray(x))

  def ref_loss(x, params):
    y, _ = reference(name, kw, x, {**v, "params": params}, train=True)
    return float(np.sum(w * y))

  p64 = {k: np.asarray(a, np.float64) for k, a in v["params"].items()}
  want_x = _numeric_grad(lambda xx: ref_loss(xx, p64), x)
  assert rel_err(g_x, want_x) < 1e-4
  for k in p64:
    want = _numeric_grad(
        lambda pk, k=k: ref_loss(np.asarray(x, np.float64), {**p64, k: pk}),
        p64[k])
    assert rel_err(g_params[k], want) < 1e-4, k



def test_closed_form_backward_matches_float64_and_autodiff():
  """batch_norm_affine's hand-written backward pass: the float64 closed form
  of the gradients, and JAX's autodiff of the forward formula."""
  rng = np.random.default_rng(21)
  # Two virtual batches of 6 examples, 5x5 maps, 7 channels; the input has
  # a large mean so cancellation would show.
  x = rng.normal(3.0, 2.0, (2, 6, 5, 5, 7))
  scale = rng.normal(1.0, 0.5, 7)
  bias = rng.normal(0.0, 0.5, 7)
  g = rng.normal(size=x.shape)
  eps = 1e-3
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, vjp = jax.vjp(lambda x, s, b: norms.batch_norm_affine(x, s, b, eps),
                   f32(x), f32(scale), f32(bias))
  dx, ds, db = vjp(f32(g))

  axes = (1, 2, 3)
  mean = x.mean(axes, keepdims=True)
  r = 1 / np.sqrt(((x - mean) ** 2).mean(axes, keepdims=True) + eps)
  xhat = (x - mean) * r
  m = np.prod(x.shape[1:4])
  want_dx = scale * r * (g - g.sum(axes, keepdims=True) / m
                         - xhat * (g * xhat).sum(axes, keepdims=True) / m)
  # float32 rounding of sums over 150 values: measured at most 3.5e-7
  # relative to the largest value (here and against autodiff below); 1e-5
  # leaves room for other summation orders.
  assert rel_err(y, xhat * scale + bias) < 1e-5
  assert rel_err(dx, want_dx) < 1e-5
  assert rel_err(ds, (g * xhat).sum((0, 1, 2, 3))) < 1e-5
  assert rel_err(db, g.sum((0, 1, 2, 3))) < 1e-5

  def plain(x, s, b):
    mu = x.mean(axes, keepdims=True)
    var = jnp.square(x - mu).mean(axes, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * s + b

  _, plain_vjp = jax.vjp(plain, f32(x), f32(scale), f32(bias))
  for got, want in zip((dx, ds, db), plain_vjp(f32(g))):
    assert rel_err(got, want) < 1e-5
