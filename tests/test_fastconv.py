"""SliceConv against nn.Conv and a float64 NumPy convolution."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import fastconv

# (input NHWC, features, kernel, padding, use_bias)
CASES = [
    ((2, 7, 7, 1), 3, (3, 3), "VALID", False),
    ((2, 6, 5, 4), 5, (3, 3), "SAME", False),
    ((3, 5, 6, 8), 4, (1, 1), "VALID", False),
    ((2, 5, 4, 3), 2, (2, 3), "SAME", True),
    ((1, 4, 4, 16), 16, (3, 3), "SAME", True),
    ((2, 6, 6, 2), 3, (3, 3), 1, False),
]


def _np_pads(padding, ks):
  if padding == "VALID":
    return [(0, 0), (0, 0)]
  if padding == "SAME":
    return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks]
  return [(padding, padding)] * 2


def _np_conv_and_grads(x, w, b, r, padding):
  """float64 y = conv(x, w) + b and the gradients of sum(y * r) w.r.t. x
  and w, by explicit loops over kernel offsets."""
  x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))
  kh, kw, _, _ = w.shape
  (hl, hh), (wl, wh) = _np_pads(padding, (kh, kw))
  xp = np.pad(x, ((0, 0), (hl, hh), (wl, wh), (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = np.zeros(x.shape[:1] + (ho, wo, w.shape[-1]))
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  for i in range(kh):
    for j in range(kw):
      win = xp[:, i:i + ho, j:j + wo, :]
      y += np.einsum("nhwc,cd->nhwd", win, w[i, j])
      dxp[:, i:i + ho, j:j + wo, :] += np.einsum("nhwd,cd->nhwc", r, w[i, j])
      dw[i, j] = np.einsum("nhwc,nhwd->cd", win, r)
  if b is not None:
    y = y + np.asarray(b, np.float64)
  dx = dxp[:, hl:hl + x.shape[1], wl:wl + x.shape[2], :]
  return y, dx, dw


def _close(actual, expected):
  expected = np.asarray(expected)
  scale = float(np.max(np.abs(expected))) or 1.0
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5,
                             atol=1e-6 * scale)


@pytest.mark.parametrize("shape,features,ks,padding,use_bias", CASES)
def test_slice_conv_matches_nn_conv_and_float64(shape, features, ks, padding,
                                                use_bias):
  kx, kr, kb = jax.random.split(jax.random.key(sum(shape) + features), 3)
  x = jax.random.normal(kx, shape, jnp.float32)
  ref_mod = nn.Conv(features, ks, padding=padding, use_bias=use_bias)
  mod = fastconv.SliceConv(features, ks, padding=padding, use_bias=use_bias)
  params = ref_mod.init(jax.random.key(0), x)["params"]
  mine = mod.init(jax.random.key(0), x)["params"]
  # Same names, shapes and initial values: checkpoints are interchangeable.
  assert jax.tree.structure(mine) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, mine, params)
  if use_bias:  # Zero-initialised; a non-zero bias tests that it is added.
    params = dict(params, bias=jax.random.normal(kb, (features,)))

  def loss(m, p, x, r):
    return jnp.sum(m.apply({"params": p}, x) * r)

  y_ref = ref_mod.apply({"params": params}, x)
  r = jax.random.normal(kr, y_ref.shape, jnp.float32)
  y = jax.jit(mod.apply)({"params": params}, x)
  gp, gx = jax.jit(jax.grad(lambda p, x: loss(mod, p, x, r), (0, 1)))(
      params, x)
  gp_ref, gx_ref = jax.grad(lambda p, x: loss(ref_mod, p, x, r), (0, 1))(
      params, x)
  assert y.shape == y_ref.shape
  _close(y, y_ref)
  _close(gx, gx_ref)
  _close(gp["kernel"], gp_ref["kernel"])

  y64, dx64, dw64 = _np_conv_and_grads(
      x, params["kernel"], params["bias"] if use_bias else None, r, padding)
  _close(y, y64)
  _close(gx, dx64)
  _close(gp["kernel"], dw64)
  if use_bias:
    _close(gp["bias"], np.asarray(r, np.float64).sum((0, 1, 2)))


def test_use_slice_conv_rule():
  use = fastconv.use_slice_conv
  assert use("auto", "cpu", (1, 1), 16)
  assert use("auto", "cpu", (3, 3), 1)
  assert not use("auto", "cpu", (3, 3), 8)
  assert not use("auto", "gpu", (1, 1), 16)
  assert use("slices", "gpu", (3, 3), 16)
  assert not use("xla", "cpu", (1, 1), 1)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="valid choices: auto, slices, xla"):
    fastconv.use_slice_conv("im2col", "cpu", (3, 3), 1)
  x = jnp.zeros((1, 5, 5, 2))
  with pytest.raises(ValueError, match="CIRCULAR"):
    fastconv.SliceConv(3, (3, 3), padding="CIRCULAR").init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="two positive sizes"):
    fastconv.SliceConv(3, (3, 3, 3)).init(jax.random.key(0), x)


def _xla_and_impl_models(cfg, impl: str, x_shape, seed: int):
  """The model of `cfg` with nn.Conv and with `conv_impl=impl`, the first's
  variables and an input; asserts that the same checkpoint loads into
  either (identical parameter trees)."""
  from jaxreg import models
  cfg.conv_impl = "xla"
  ref = models.build_model(cfg, 10)
  cfg.conv_impl = impl
  other = models.build_model(cfg, 10)
  x = jnp.asarray(np.random.default_rng(seed).normal(size=x_shape),
                  jnp.float32)
  variables = ref.init(jax.random.key(0), x)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(other.init(jax.random.key(0), x)))
  return ref, other, variables, x


@pytest.mark.parametrize("impl", ["auto", "slices"])
def test_mnist_cnn_conv_impls_share_params_and_outputs(impl):
  from jaxreg import config as config_lib
  cfg = config_lib.model_config()
  cfg.norm = "group"  # No batch statistics: one forward pass to compare.
  ref, other, variables, x = _xla_and_impl_models(cfg, impl, (3, 28, 28, 1),
                                                  seed=0)
  np.testing.assert_allclose(other.apply(variables, x),
                             ref.apply(variables, x), rtol=1e-4, atol=1e-5)
  # "slices" replaces every conv; on CPU "auto" the 1x1 transitions and
  # conv1 (one input channel) only, the layers where slices measured faster.
  kinds = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      kinds[context.module.name] = type(context.module).__name__
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    other.apply(variables, x)
  convs = {k: v for k, v in kinds.items()
           if k and k.startswith(("conv", "trans"))}
  assert len(convs) == 9
  if impl == "slices" or jax.default_backend() != "cpu":
    expect_slices = set(convs) if impl == "slices" else set()
  else:
    expect_slices = {"conv1", "trans1", "trans2"}
  assert {k for k, v in convs.items() if v == "SliceConv"} == expect_slices
  assert all(v in ("SliceConv", "Conv") for v in convs.values())

def test_mnist_cnn_refuses_unknown_conv_impl():
  from jaxreg import config as config_lib
  from jaxreg import models
  cfg = config_lib.model_config()
  cfg.conv_impl = "im2col"
  with pytest.raises(ValueError, match="conv_impl='im2col'; valid choices"):
    models.build_model(cfg, 10)


@pytest.mark.parametrize("name,kw", [("cifar_resnet", {"depth": 8}),
                                     ("resnet9", {"width": 4})])
@pytest.mark.parametrize("impl", ["auto", "slices"])
def test_resnet_conv_impls_share_params_and_outputs(name, kw, impl):
  from jaxreg import config as config_lib
  cfg = config_lib.model_config()
  cfg.name = name
  cfg.update(kw)
  cfg.norm = "group"  # No batch statistics: one forward pass to compare.
  cfg.norm_kwargs.num_groups = 4
  ref, other, variables, x = _xla_and_impl_models(cfg, impl, (2, 16, 16, 1),
                                                  seed=1)
  # float32 summation orders differ (dots vs convolutions); measured
  # 6e-7 absolute on logits of size ~1.
  np.testing.assert_allclose(jax.jit(other.apply)(variables, x),
                             jax.jit(ref.apply)(variables, x), rtol=1e-4,
                             atol=1e-5)
  kinds = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
        context.module, (nn.Conv, fastconv.SliceConv)):
      kinds[context.module.path] = (type(context.module).__name__,
                                    getattr(context.module, "strides", 1))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # Tracing is enough to see them.
    jax.eval_shape(other.apply, variables, x)
  strided = {p for p, (_, s) in kinds.items() if s not in (1, None, (1, 1))}
  slices = {p for p, (k, _) in kinds.items() if k == "SliceConv"}
  # Strided convs always stay nn.Conv.
  assert not slices & strided
  if impl == "slices":
    assert slices == set(kinds) - strided
  else:
    # "auto" keeps nn.Conv in the ResNets (measured, models/resnets.py).
    assert not slices
