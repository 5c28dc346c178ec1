"""Tests for jaxreg.models: every model x every norm, plus numeric references.

Compile budget: one jitted train+eval function per (model, norm) pair at tiny
sizes; parameter counts and shapes come from jax.eval_shape (no compile).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import config as config_lib
from jaxreg import models
from jaxreg import norms

MODEL_NAMES = models.MODELS.names()
NORM_NAMES = norms.NORMS.names()
SHAPES = ((28, 28, 1), (32, 32, 3))
BATCH = 4


# Small sizes, each set only for the models that read it (the others
# refuse it).
TINY = {"depth": 8, "stage_sizes": (1, 1, 1, 1), "width": 4}


def tiny_cfg(name: str, norm: str = "batch", **overrides):
  cfg = config_lib.model_config()
  cfg.name = name
  cfg.norm = norm
  reads = models.MODELS.get(name).options if name in models.MODELS else {}
  for field, value in {**TINY, **overrides}.items():
    if field in reads or field in overrides:
      cfg[field] = value
  return cfg


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def key(seed: int) -> jax.Array:
  # XLA's RngBitGenerator: threefry's unrolled rounds dominate the CPU
  # compile time of these tiny models (init and dropout), several-fold.
  return jax.random.key(seed, impl="rbg")


def jit_fast_compile(fn):
  """jax.jit with XLA's cheapest CPU backend pipeline: these functions run
  once on tiny inputs, so compile time is what the tests wait for."""

  def run(*args):
    return jax.jit(fn).lower(*args).compile(
        {"xla_backend_optimization_level": 0})(*args)
  return run


def init(model, shape, seed=0):
  x = jax.random.normal(key(seed), (BATCH,) + shape)
  variables = jit_fast_compile(
      lambda x: model.init(key(seed + 1), x, train=False))(x)
  return variables, x


def flat(tree) -> dict[str, jax.Array]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def np_conv(x, w, stride=1, pad=0):
  """float64 NHWC x HWIO convolution, the independent reference."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  x = np.pad(np.asarray(x, np.float64), pads)
  w = np.asarray(w, np.float64)
  kh, kw, _, _ = w.shape
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
      out += np.einsum("nhwc,co->nhwo", patch, w[i, j])
  return out


# --------------------------------------------------------------------------
# One SGD step for every model x norm.


def _uses_norm(name: str, norm: str) -> bool:
  return name not in models.NORM_FREE_MODELS and norm != "none"


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sgd_step(name, norm):
  shape = SHAPES[NORM_NAMES.index(norm) % 2]
  default_norm = config_lib.model_config().norm
  if name in models.NORM_FREE_MODELS and norm not in (default_norm, "none"):
    # A norm-free model reads no norm option: another norm is refused.
    with pytest.raises(ValueError, match=rf"config\.model\.norm='{norm}' "
                       rf"\(read by .*\): not read by model '{name}'"):
      models.build_model(tiny_cfg(name, norm), 10)
    return
  # Two bottleneck stages (projection, stride and every slot included): the
  # other two would only repeat them at twice the compile time.
  small = ({"stage_sizes": (1, 1)}
           if "stage_sizes" in models.MODELS.get(name).options else {})
  model = models.build_model(tiny_cfg(name, norm, **small), 10)
  x = jax.random.normal(key(0), (BATCH,) + shape)
  labels = jnp.arange(BATCH) % 10
  keeps_stats = (norm in norms.KEEPS_RUNNING_STATS
                 and name not in models.NORM_FREE_MODELS)

  # 7 classes changes only the classifier; shapes from eval_shape (no compile).
  model7 = models.build_model(tiny_cfg(name, norm), 7)
  out7 = jax.eval_shape(lambda x: model7.init_with_output(
      key(1), x, train=False)[0], x)
  assert out7.shape == (BATCH, 7) and out7.dtype == jnp.float32

  if name in models.NORM_FREE_MODELS and norm != default_norm:
    # "none" says what the model is: the network compiled for the default
    # norm, so only check that it really is the same one.
    default = models.build_model(
        tiny_cfg(name, default_norm, **small), 10)
    assert model == default
    assert "batch_stats" not in jax.eval_shape(
        lambda x: model.init(key(1), x, train=False), x)
    return

  def init_and_step(x, labels, rng):
    init_key, dropout_key = jax.random.split(rng)
    variables = model.init(init_key, x, train=False)
    params, state = variables["params"], {
        k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
      logits, new_state = model.apply(
          {"params": p, **state}, x, train=True, rngs={"dropout": dropout_key},
          mutable=["batch_stats"])
      return cross_entropy(logits, labels), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    new_vars = {"params": jax.tree.map(lambda p, g: p - 0.02 * g, params,
                                       grads), **state, **new_state}
    logits = model.apply(new_vars, x, train=False)
    return variables, loss, grads, new_vars, logits

  variables, loss, grads, new_vars, logits = jit_fast_compile(init_and_step)(
      x, labels, key(1))
  assert np.isfinite(float(loss)), loss
  # Logits start small, so the loss is near log(10) for any sane init.
  assert abs(float(loss) - math.log(10)) < 1.5, loss
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Every parameter is connected to the loss (NF branches start closed by
  # skip_gain = 0, so only their gains get a gradient at init).
  silent = [k for k, g in flat(grads).items() if not np.any(np.asarray(g))]
  if name in models.NORM_FREE_MODELS:
    assert "classifier/kernel" not in silent
  else:
    assert not silent, silent
  assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert ("batch_stats" in variables) == keeps_stats, sorted(variables)
  assert ("batch_stats" in new_vars) == keeps_stats
  assert models.count_params(model, shape) == sum(
      v.size for v in jax.tree.leaves(variables["params"]))
  if keeps_stats:
    before = flat(variables["batch_stats"])
    after = flat(new_vars["batch_stats"])
    assert before.keys() == after.keys()
    changed = [k for k in before if not np.allclose(before[k], after[k])]
    # Every running statistic moves towards the batch statistics.
    assert sorted(changed) == sorted(before), set(before) - set(changed)
  has_norm_params = any("norm" in k for k in flat(variables["params"]))
  assert has_norm_params == _uses_norm(name, norm)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_both_input_shapes(name, shape):
  model = models.build_model(tiny_cfg(name), 10)
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(
      key(0), x, train=False)[0], x)
  assert out.shape == (2, 10)


# --------------------------------------------------------------------------
# Parameter counts against closed forms and published figures.


def test_resnet9_param_count():
  cfg = config_lib.model_config()
  cfg.name = "resnet9"
  n = models.count_params(models.build_model(cfg, 10), (32, 32, 3))
  convs = 9 * (3 * 64 + 64 * 128 + 2 * 128 * 128 + 128 * 256 + 256 * 512
               + 2 * 512 * 512)
  norm_affine = 2 * (64 + 3 * 128 + 256 + 3 * 512)
  assert n == convs + norm_affine + 512 * 10 == 6_573_120
  assert abs(n - 6.57e6) / 6.57e6 < 0.01


def test_resnet50_param_count_matches_published_cifar_resnet50():
  # The CIFAR ResNet-50 (3x3 stem, no max-pool, 10 classes) has 23,520,842
  # parameters, BatchNorm affine included.
  cfg = config_lib.model_config()
  cfg.name = "resnet50"
  assert models.count_params(models.build_model(cfg, 10),
                             (32, 32, 3)) == 23_520_842


@pytest.mark.parametrize("depth", [14, 20])
def test_cifar_resnet_param_count(depth):
  cfg = config_lib.model_config()
  cfg.name, cfg.depth = "cifar_resnet", depth
  n = (depth - 2) // 6
  expected = 27 * 16 + 2 * 16  # stem conv + norm
  c_in = 16
  for c in (16, 32, 64):
    for _ in range(n):
      # Two convs and two norms; option A shortcuts have no parameters.
      expected += 9 * c_in * c + 9 * c * c + 4 * c
      c_in = c
  expected += 64 * 10 + 10
  got = models.count_params(models.build_model(cfg, 10), (32, 32, 3))
  assert got == expected
  if depth == 20:
    assert round(got / 1e6, 2) == 0.27  # He et al. 2016, Table 6.


@pytest.mark.parametrize("norm,affine", [("batch", True), ("none", False)])
def test_mnist_cnn_param_count(norm, affine):
  cfg = config_lib.model_config()
  cfg.norm = norm
  model = models.build_model(cfg, 10)
  convs = 9 * (1 * 8 + 8 * 16 + 8 * 16 + 16 * 16 + 16 * 16 + 8 * 16 + 16 * 16)
  trans = 2 * 16 * 8
  norm_params = 2 * (8 + 6 * 16) if affine else 0
  expected = convs + trans + norm_params + 16 * 10 + 10
  assert models.count_params(model, (28, 28, 1)) == expected
  assert 10_000 <= expected <= 15_000
  # Three input channels add 2 * 9 * 8 weights to the first conv only.
  assert models.count_params(model, (32, 32, 3)) == expected + 144


# --------------------------------------------------------------------------
# ResNet-50 slots: norm_layers and dropout_layers.


@pytest.mark.parametrize("norm_layers", [0, 1, 2, 3])
def test_resnet50_norm_layers(norm_layers):
  model = models.build_model(
      tiny_cfg("resnet50", "batch", norm_layers=norm_layers), 10)
  abstract = jax.eval_shape(lambda: model.init(
      key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  params = flat(abstract["params"])
  block = {k.split("/", 1)[1] for k in params if k.startswith("stage2_block1/")}
  for k in (1, 2, 3):
    has = k <= norm_layers
    assert (f"norm{k}/scale" in block) == has
    # A conv followed by a norm has no bias, one without has a bias.
    assert (f"conv{k}/bias" in block) == (not has)
  assert ("proj_norm/scale" in block) == (norm_layers > 0)
  assert ("stem_norm/scale" in params) == (norm_layers > 0)
  if norm_layers == 0:
    assert not [k for k in params if "norm" in k or k.endswith("scale")]
    assert "batch_stats" not in abstract


def test_resnet50_dropout_slots():
  model = models.build_model(
      tiny_cfg("resnet50", "none", dropout_layers=2, dropout=0.5), 10)
  assert model.dropout_rates == (0.5, 0.5, 0.0)
  paths = models.feature_layers(model, (32, 32, 3))
  assert "stage1_block1/drop2" in paths
  assert "stage1_block1/drop3" not in paths
  per_slot = models.build_model(tiny_cfg(
      "resnet50", dropout_layers=3, dropout=0.5,
      dropout_per_slot=(0.1, 0.2, 0.3)), 10)
  assert per_slot.dropout_rates == (0.1, 0.2, 0.3)  # per-slot wins.


@pytest.mark.parametrize("name", ["resnet50", "nf_resnet"])
def test_dropout_layers_change_output_in_train_mode_only(name):
  plain = models.build_model(tiny_cfg(name, "none", stage_sizes=(1, 1)), 10)
  dropped = models.build_model(tiny_cfg(
      name, "none", stage_sizes=(1, 1), dropout_layers=3,
      dropout_per_slot=(0.3, 0.3, 0.3)), 10)
  variables, x = init(plain, (32, 32, 3))
  # NF blocks start as the identity (skip_gain = 0), which would hide any
  # dropout in the branch; open the branches.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if "skip_gain" in str(p) else v, variables)

  def outputs(variables, x):
    return (plain.apply(variables, x, train=False),
            dropped.apply(variables, x, train=False),
            dropped.apply(variables, x, train=True, rngs={"dropout": key(0)}),
            dropped.apply(variables, x, train=True, rngs={"dropout": key(1)}))

  ref_eval, eval_, a, b = jit_fast_compile(outputs)(variables, x)
  # Eval mode: identical to the model without dropout.
  np.testing.assert_allclose(eval_, ref_eval, rtol=1e-6, atol=1e-6)
  # Train mode: the output depends on the dropout mask (norm "none" makes
  # train and eval mode otherwise identical, so at most one of two masks
  # could reproduce the dropout-free output).
  assert not np.allclose(a, b, atol=1e-4)
  assert not np.allclose(a, ref_eval, atol=1e-4)


def test_resnet9_dropout_in_residuals_only_in_train_mode():
  model = models.build_model(tiny_cfg("resnet9", "none", dropout=0.3), 10)
  paths = models.feature_layers(model, (32, 32, 3))
  assert [p for p in paths if "drop" in p] == [
      "layer1_res1_drop", "layer1_res2_drop", "layer3_res1_drop",
      "layer3_res2_drop"]
  plain = models.build_model(tiny_cfg("resnet9", "none"), 10)
  variables, x = init(plain, (32, 32, 3))

  def outputs(variables, x):
    return (model.apply(variables, x, train=False),
            plain.apply(variables, x, train=False),
            model.apply(variables, x, train=True, rngs={"dropout": key(0)}),
            plain.apply(variables, x, train=True))

  eval_, ref_eval, train, ref_train = jit_fast_compile(outputs)(variables, x)
  np.testing.assert_allclose(eval_, ref_eval, rtol=1e-6, atol=1e-6)
  assert not np.allclose(train, ref_train, atol=1e-5)


# --------------------------------------------------------------------------
# Dropout rates as traced values (models.DROPOUT_COLLECTION).


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_traced_dropout_is_nn_dropout_bit_for_bit(p):
  """Same rng, same mask and scale as nn.Dropout(p), under jit (as the
  train step runs it), with the keep probability a traced argument."""
  x = jax.random.normal(key(0), (4, 6, 6, 8))
  rngs = {"dropout": jax.random.key(3)}
  static = nn.Dropout(p, name="drop1")
  traced = models.TracedDropout(name="drop1")

  @jax.jit
  def both(x, keep):
    return (static.apply({}, x, deterministic=False, rngs=rngs),
            traced.apply({}, x, keep, False, rngs=rngs),
            traced.apply({}, x, keep, True, rngs=rngs))

  keep = models.dropout_keep(tiny_cfg("mnist_cnn", dropout=p))["dropout"]
  assert keep == np.float32(1.0 - p)
  want, got, eval_ = (np.asarray(a) for a in both(x, keep))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(eval_, x)
  # Against the definition: kept units scaled by 1 / (1 - p), about a
  # fraction 1 - p of them kept.
  kept = got != 0
  np.testing.assert_allclose(got[kept], np.asarray(x, np.float64)[kept] /
                             (1 - p), rtol=1e-6)
  assert abs(kept.mean() - (1 - p)) < 0.05
  # Rate 0 (keep 1): the input itself, though a mask is drawn.
  _, same, _ = both(x, np.float32(1.0))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(x))


# (model, a member's own rates, the group's rates): the group's model has
# every slot (at its largest rate); the member's rates come traced.
TRACED_CASES = [
    ("mnist_cnn", (28, 28, 1), {"dropout": 0.05}, {"dropout": 0.2}),
    ("cifar_resnet", (32, 32, 3), {"dropout": 0.1}, {"dropout": 0.3}),
    # Rate 0: a slot the member's own model skips.
    ("resnet9", (32, 32, 3), {"dropout": 0.0}, {"dropout": 0.3}),
    # Slot 2 exists only in the group's model: slot 1's masks (and the
    # next blocks') must not change.
    ("resnet50", (32, 32, 3),
     {"dropout_layers": 2, "dropout_per_slot": (0.1, 0.0)},
     {"dropout_layers": 2, "dropout_per_slot": (0.3, 0.2)}),
    ("nf_resnet", (32, 32, 3),
     {"dropout_layers": 2, "dropout": 0.2},
     {"dropout_layers": 2, "dropout_per_slot": (0.3, 0.4)}),
]


@pytest.mark.parametrize("name,shape,own,group", TRACED_CASES,
                         ids=[f"{c[0]}-{i}"
                              for i, c in enumerate(TRACED_CASES)])
def test_traced_rates_train_as_the_members_own_model(name, shape, own, group):
  """The group's model given a member's dropout_keep computes, bit for bit,
  what the member's own model (static rates, rate-0 slots skipped) does:
  logits and updated batch statistics, with the same dropout rng."""
  small = {"stage_sizes": (1, 1)} if name in ("resnet50", "nf_resnet") else {}
  own_cfg = tiny_cfg(name, **small, **own)
  mine = models.build_model(own_cfg, 10)
  shared = models.build_model(tiny_cfg(name, **small, **group), 10)
  variables, x = init(shared, shape)
  # NF blocks start as the identity (skip_gain = 0): open the branches.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if "skip_gain" in str(p) else v, variables)
  rngs = {"dropout": key(7)}

  @jax.jit
  def run(variables, x, keep):
    train = lambda m, v: m.apply(v, x, train=True, rngs=rngs,
                                 mutable=["batch_stats"])
    return (train(mine, variables),
            train(shared, {**variables, models.DROPOUT_COLLECTION: keep}),
            train(shared, variables))

  keep = models.dropout_keep(own_cfg)
  (want, want_stats), (got, got_stats), (other, _) = run(variables, x, keep)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The traced rates are what made them equal: the group's own static
  # rates give other logits.
  assert not np.allclose(np.asarray(other), np.asarray(want), atol=1e-5)


def test_dropout_keep_per_model():
  f32 = np.float32
  assert models.dropout_keep(tiny_cfg("mnist_cnn", dropout=0.1)) == {
      "dropout": f32(0.9)}
  assert models.dropout_keep(tiny_cfg("resnet9")) == {"dropout": f32(1.0)}
  assert models.dropout_keep(tiny_cfg(
      "resnet50", dropout=0.1, dropout_layers=2)) == {
          "drop1": f32(0.9), "drop2": f32(0.9)}
  assert models.dropout_keep(tiny_cfg(
      "nf_resnet", dropout=0.1, dropout_layers=3,
      dropout_per_slot=(0.2, 0.0, 0.3))) == {
          "drop1": f32(0.8), "drop2": f32(1.0), "drop3": f32(0.7)}
  assert models.dropout_keep(tiny_cfg("resnet50", dropout=0.1)) == {}
  assert models.dropout_keep(tiny_cfg("airbench", dropout=0.1)) == {}
  # Rounded once from float64, as nn.Dropout's keep probability.
  assert models.dropout_keep(tiny_cfg("mnist_cnn", dropout=0.3))[
      "dropout"] == f32(1.0 - 0.3)
  with pytest.raises(ValueError, match="valid choices"):
    models.dropout_keep(tiny_cfg("lenet"))


def test_unknown_dropout_keep_name_lists_choices():
  model = models.build_model(tiny_cfg("resnet50", stage_sizes=(1,)), 10)
  variables = jax.eval_shape(
      lambda: model.init(key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = {**variables, models.DROPOUT_COLLECTION: {"dropout": 0.9}}
  with pytest.raises(ValueError, match="valid choices: drop1, drop2, drop3"):
    jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((1, 32, 32, 3)), train=True, rngs={"dropout": key(0)},
        mutable=["batch_stats"]), variables)


# --------------------------------------------------------------------------
# Building blocks against independent references.


def test_option_a_shortcut_is_subsample_plus_zero_channels():
  block = models.BasicBlock(features=8, strides=2,
                            norm=norms.make_norm("none"))
  x = jax.random.normal(key(0), (2, 6, 6, 4))
  variables = block.init(key(1), x)
  # Zero branch: the output is relu(shortcut) alone.
  zeroed = jax.tree.map(jnp.zeros_like, variables)
  out = np.asarray(block.apply(zeroed, x))
  expected = np.zeros((2, 3, 3, 8))
  expected[..., :4] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
  np.testing.assert_array_equal(out, expected)
  assert "proj_conv" not in variables["params"]


def test_resnet9_logits_are_scaled_classifier_of_global_max_pool():
  model = models.build_model(tiny_cfg("resnet9", "none"), 10)
  variables, x = init(model, (32, 32, 3))
  logits, layer3, res = jit_fast_compile(lambda v, x: (
      model.apply(v, x, train=False),
      models.capture_features(model, v, x, "layer3"),
      models.capture_features(model, v, x, "layer3_res2")))(variables, x)
  pooled = np.max(np.asarray(layer3, np.float64) + np.asarray(res, np.float64),
                  axis=(1, 2))
  kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
  assert "bias" not in variables["params"]["classifier"]
  np.testing.assert_allclose(logits, 0.125 * pooled @ kernel,
                             rtol=1e-4, atol=1e-5)


def test_relu_gamma_closed_form():
  # Var[relu(z)] = 1/2 - 1/(2 pi) for z ~ N(0, 1), so gamma = 1 / std.
  assert models.RELU_GAMMA == pytest.approx(
      1 / math.sqrt(0.5 - 0.5 / math.pi), rel=1e-12)
  assert models.RELU_GAMMA == pytest.approx(1.7128585504, rel=1e-9)
  z = np.random.default_rng(0).standard_normal(2_000_000)
  assert np.std(np.maximum(z, 0) * models.RELU_GAMMA) == pytest.approx(
      1.0, abs=3e-3)


def test_wsconv_matches_numpy_reference():
  conv = models.WSConv(features=5, kernel_size=3, strides=2)
  x = jax.random.normal(key(0), (2, 7, 7, 3))
  variables = conv.init(key(1), x)
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(0.3, 2.0, (3, 3, 3, 5)),
            "gain": rng.uniform(0.5, 2.0, 5), "bias": rng.normal(size=5)}
  out = conv.apply({"params": jax.tree.map(jnp.float32, params)}, x)
  w = params["kernel"]
  w_hat = (w - w.mean(axis=(0, 1, 2))) / np.sqrt(27 * w.var(axis=(0, 1, 2)))
  # Each output unit's standardized weights have zero mean and unit norm.
  np.testing.assert_allclose(np.sum(w_hat**2, axis=(0, 1, 2)), 1.0)
  expected = (np_conv(x, w_hat * params["gain"], stride=2, pad=1)
              + params["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  assert variables["params"]["kernel"].shape == (3, 3, 3, 5)


def test_nf_block_betas_closed_form():
  a2 = 0.2**2
  expected = [[1.0, math.sqrt(1 + a2)],
              [math.sqrt(1 + 2 * a2), math.sqrt(1 + a2), math.sqrt(1 + 2 * a2)]]
  got = models.nf_block_betas((2, 3), 0.2)
  np.testing.assert_allclose(got[0], expected[0])
  np.testing.assert_allclose(got[1], expected[1])


def test_nf_resnet_signal_propagation_tracks_expected_variance():
  """With the branches open (skip_gain = 1), the variance of each block's
  output must follow the analytic schedule the betas assume."""
  cfg = tiny_cfg("nf_resnet", stage_sizes=(2, 2), width=16)
  model = models.build_model(cfg, 10)
  variables, _ = init(model, (16, 16, 3))
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if "skip_gain" in str(p) else v, variables)
  x = jax.random.normal(key(3), (64, 16, 16, 3))
  betas = models.nf_block_betas((2, 2), 0.2)
  # Block outputs feed the next block (whose beta is their expected std).
  pairs = [("stage1_block1", betas[0][1]), ("stage1_block2", betas[1][0]),
           ("stage2_block2", math.sqrt(1 + 2 * 0.04))]
  layers = ["stem_conv"] + [layer for layer, _ in pairs]
  feats = jit_fast_compile(lambda v, x: [
      models.capture_features(model, v, x, layer) for layer in layers])(
          variables, x)
  # The stem's WSConv keeps the unit variance of its input.
  assert np.var(feats[0]) == pytest.approx(1.0, rel=0.25)
  for (layer, std), h in zip(pairs, feats[1:]):
    assert np.var(h) == pytest.approx(std**2, rel=0.25), layer


def test_nf_resnet_ignores_norm_and_starts_as_identity_blocks():
  model = models.build_model(tiny_cfg("nf_resnet", "batch"), 10)
  variables, x = init(model, (32, 32, 3))
  assert set(variables) == {"params"}
  params = flat(variables["params"])
  assert not [k for k in params if "norm" in k]
  assert all(float(v) == 0.0 for k, v in params.items() if "skip_gain" in k)
  layers = ("stem_conv", "stage1_block1", "stage1_block1/proj_conv",
            "stage2_block1", "stage2_block1/proj_conv")
  stem, block1, proj1, block2, proj2 = jit_fast_compile(lambda v, x: [
      models.capture_features(model, v, x, layer) for layer in layers])(
          variables, x)
  assert stem.shape[-1] == 4 and block1.shape[-1] == 16
  # With the branch closed a block is its shortcut: here the projections.
  np.testing.assert_allclose(block1, proj1, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(block2, proj2, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# capture_features / feature_layers.


def test_capture_features_matches_numpy_conv_and_logits():
  model = models.build_model(tiny_cfg("cifar_resnet", "batch"), 10)
  variables, x = init(model, (32, 32, 3))
  # Non-trivial running statistics, so eval mode is distinguishable.
  variables = {**variables, "batch_stats": jax.tree.map(
      lambda v: v + 0.5, variables["batch_stats"])}
  layers = ("stem_conv", "stem_norm", "stage2_block1", "stage3_block1/norm2",
            "classifier")
  # Inside jit, as a training loop would call it; no dropout rng needed.
  stem, stem_norm, block, norm, classifier = jit_fast_compile(
      lambda v, x: [models.capture_features(model, v, x, layer)
                    for layer in layers])(variables, x)
  kernel = variables["params"]["stem_conv"]["kernel"]
  expected = np_conv(x, kernel, pad=1)
  np.testing.assert_allclose(stem, expected, rtol=1e-4, atol=1e-4)
  # Eval mode: the norm uses the running statistics (mean 0.5, var 1.5).
  np.testing.assert_allclose(stem_norm, (expected - 0.5) / np.sqrt(1.5 + 1e-5),
                             rtol=1e-4, atol=1e-4)
  assert block.shape == (BATCH, 16, 16, 32)
  assert norm.shape == (BATCH, 8, 8, 64)
  np.testing.assert_allclose(
      classifier, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-6)


def test_capture_features_unknown_layer_lists_choices():
  model = models.build_model(tiny_cfg("mnist_cnn", "batch"), 10)
  variables, x = init(model, (28, 28, 1))
  paths = models.feature_layers(model, (28, 28, 1))
  assert paths[:3] == ["conv1", "norm1", "conv2"]
  assert "classifier" in paths and "trans2" in paths
  with pytest.raises(ValueError, match="valid choices: conv1, norm1, conv2"):
    models.capture_features(model, variables, x, "conv9")
  with pytest.raises(ValueError, match="unknown feature layer"):
    models.capture_features(model, variables, x, "")


# --------------------------------------------------------------------------
# Validation at build time.


@pytest.mark.parametrize("name,overrides,num_classes,match", [
    ("resnet18", {}, 10, "valid choices: airbench, cifar_resnet, mnist_cnn"),
    ("resnet50", {"norm": "batchnorm"}, 10, "valid choices: batch, batch_flax"),
    ("resnet50", {"norm_layers": 4}, 10,
     "norm_layers=4: set it to an integer in 0..3"),
    ("resnet50", {"norm_layers": -1}, 10, "norm_layers=-1"),
    ("resnet50", {"dropout_layers": 5}, 10,
     "dropout_layers=5: set it to an integer"),
    ("resnet50", {"dropout": 1.0}, 10,
     r"dropout=1.0: set a probability in \[0, 1\)"),
    ("mnist_cnn", {"dropout": -0.1}, 10, "dropout=-0.1"),
    ("resnet50", {"dropout_layers": 2, "dropout_per_slot": (0.1, 0.2, 0.3)},
     10, "has 3 values but dropout_layers=2"),
    ("nf_resnet", {"dropout_layers": 2, "dropout_per_slot": (0.1, 1.5)}, 10,
     r"every probability must be in \[0, 1\)"),
    ("cifar_resnet", {"depth": 15}, 10, "depth = 6n\\+2"),
    ("cifar_resnet", {"depth": 2}, 10, "depth = 6n\\+2"),
    ("resnet50", {"stage_sizes": ()}, 10, "stage_sizes"),
    ("nf_resnet", {"stage_sizes": (1, 0)}, 10, "positive block counts"),
    ("resnet9", {"width": 0}, 10, "width=0: set a positive integer"),
    ("airbench", {"logit_scale": 0.0}, 10,
     "logit_scale=0.0: set a positive number"),
    ("nf_resnet", {"nf_alpha": -0.2}, 10,
     "nf_alpha=-0.2: set a positive number"),
    ("airbench", {"whiten_patch": 0}, 10, "whiten_patch=0: set a positive"),
    ("airbench", {"whiten_eps": 0.0}, 10, "whiten_eps=0.0: set a positive"),
    ("airbench", {"dtype": "float8"}, 10,
     "dtype='float8': valid choices: float32, bfloat16, float16"),
    ("mnist_cnn", {"conv_impl": "im2col"}, 10, "conv_impl='im2col'"),
    ("resnet50", {}, 1, "num_classes=1: a classifier needs an integer >= 2"),
])
def test_build_model_validation(name, overrides, num_classes, match):
  cfg = config_lib.model_config()
  cfg.name = name
  for field, value in overrides.items():
    cfg[field] = value
  with pytest.raises(ValueError, match=match):
    models.build_model(cfg, num_classes)
  with pytest.raises(ValueError, match=match):
    models.validate(cfg, num_classes)


def test_every_model_option_has_a_default_and_a_reader():
  defaults = set(config_lib.model_config())
  read = set()
  for name in MODEL_NAMES:
    options = set(models.MODELS.get(name).options)
    assert options <= defaults, (name, options - defaults)
    assert set(models.SHARED_OPTIONS) <= options, name
    read |= options
  assert read == defaults, defaults - read
  assert set(models.NORM_OPTIONS) | set(models.SHARED_OPTIONS) <= defaults
  for family in models.DROPOUT_OPTIONS.values():
    assert set(family) <= defaults


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_validate_checks_only_the_chosen_models_options(name):
  options = models.MODELS.get(name).options
  cfg = config_lib.model_config()
  cfg.name = name
  models.validate(cfg, 10)
  # Its options at the defaults and every other one at its default: fine,
  # even one that would be bad for the model that reads it.
  others = {"depth": 15, "width": 0, "conv_impl": "im2col",
            "dtype": "float8", "dropout_layers": 5, "nf_alpha": -1.0}
  for key, bad in others.items():
    if key in options:
      continue
    cfg = config_lib.model_config()
    cfg.name = name
    cfg[key] = bad
    with pytest.raises(ValueError) as e:
      models.validate(cfg, 10)
    message = str(e.value)
    assert f"config.model.{key}={bad!r} (read by " in message, message
    assert f"not read by model {name!r}, which takes " in message
    assert ", ".join(sorted(options)) in message
    assert f"{key}={config_lib.model_config()[key]!r}" in message


def test_unread_options_are_refused_in_one_error():
  cfg = tiny_cfg("mnist_cnn")
  cfg.depth, cfg.stage_sizes = 8, (1, 1, 1, 1)
  with pytest.raises(ValueError) as e:
    models.build_model(cfg, 10)
  message = str(e.value)
  assert message.startswith(
      "config.model.depth=8 (read by cifar_resnet); "
      "config.model.stage_sizes=(1, 1, 1, 1) (read by nf_resnet, resnet50): "
      "not read by model 'mnist_cnn', which takes conv_impl, dropout, name, "
      "norm, norm_kwargs; set them back to their defaults (depth=14, "
      "stage_sizes=(3, 4, 6, 3))"), message
  cfg = tiny_cfg("airbench", dropout=0.1)
  with pytest.raises(ValueError, match=r"config\.model\.dropout=0\.1 \(read "
                     "by cifar_resnet, mnist_cnn, nf_resnet, resnet50, "
                     r"resnet9\): not read by model 'airbench'"):
    models.build_model(cfg, 10)
  cfg = tiny_cfg("cifar_resnet", dropout_layers=2)
  with pytest.raises(ValueError, match="dropout_layers=2 .read by nf_resnet, "
                     "resnet50."):
    models.build_model(cfg, 10)
  cfg = config_lib.model_config()
  cfg.unknown_option = 1
  with pytest.raises(ValueError, match="unknown_option is not an option of "
                     "any model"):
    models.validate(cfg, 10)


def test_norm_free_model_refuses_norm_options_but_takes_agreeing_ones():
  # norm="none" and norm_layers=0 agree with a normalization-free model
  # (S2 swaps resnet50 at norm_layers=0 for nf_resnet).
  models.build_model(tiny_cfg("nf_resnet", "none", norm_layers=0), 10)
  for field, value in (("norm", "layer"), ("norm_layers", 2)):
    with pytest.raises(ValueError, match=rf"{field}={value!r} \(read by "
                       r"[a-z0-9_, ]+\): not read by model 'nf_resnet'"):
      models.build_model(tiny_cfg("nf_resnet", **{field: value}), 10)
  cfg = tiny_cfg("nf_resnet")
  cfg.norm_kwargs.num_groups = 2
  with pytest.raises(ValueError,
                     match=r"config\.model\.norm_kwargs\.num_groups=2 "):
    models.build_model(cfg, 10)


def test_slot_rates():
  cfg = tiny_cfg("resnet50", dropout=0.2, dropout_layers=2)
  assert models.slot_rates(cfg) == (0.2, 0.2)
  assert models.slot_rates(cfg, pad=True) == (0.2, 0.2, 0.0)
  cfg.dropout_per_slot = (0.1, 0.3)
  assert models.slot_rates(cfg) == (0.1, 0.3)
  assert models.build_model(cfg, 10).dropout_rates == (0.1, 0.3, 0.0)
  assert models.slot_rates(tiny_cfg("nf_resnet")) == ()


def test_default_config_builds_every_model():
  cfg = config_lib.model_config()
  assert cfg.name == "mnist_cnn" and cfg.norm == "batch"
  assert cfg.dropout_per_slot is None
  assert set(cfg.norm_kwargs) == set().union(*norms.OPTIONS.values())
  for name in MODEL_NAMES:
    cfg.name = name
    assert isinstance(models.build_model(cfg, 10), nn.Module)


def test_mnist_cnn_with_instance_norm_cannot_see_the_input(caplog):
  """S3's block order ends in a norm followed by global average pooling; the
  spatial mean of an instance-normalized map is its bias, so the logits are
  the same for every image (why the instance smoke run stays at chance), and
  build_model says so."""
  cfg = tiny_cfg("mnist_cnn", "instance")
  with caplog.at_level("WARNING"):
    model = models.build_model(cfg, 10)
  assert "chance" in caplog.text
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  # Non-trivial biases, so the constant is not just zero.
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  logits = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
  # A norm that keeps per-channel means does see the input.
  other = models.build_model(tiny_cfg("mnist_cnn", "layer"), 10)
  v2 = jax.tree.map(lambda v: v + 0.1, other.init(jax.random.key(1), x,
                                                    train=False))
  out = other.apply(v2, x, train=False)
  assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3
