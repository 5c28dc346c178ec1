"""The speedrun recipe (configs/speedrun.py) and each piece it adds.

Every numeric piece against an independent float64 NumPy reference: the
patch-whitening kernel, the airbench forward pass, the dirac init, frozen
and LR-multiplied params under the optimizer chain, TTA against explicitly
built views, and the lookahead average against airbench's loop written out.
Then the recipe end to end: a trainer on random CIFAR-shaped data (one
compile, shared), and the smoke config through TFDS's mocked CIFAR-10.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import augment
from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import engine as engine_lib
from jaxreg import models
from jaxreg import optim
from jaxreg import steps as steps_lib
from jaxreg import train
from jaxreg import validation
from tests.helpers import ROOT

# Whitening the patches of these images must undo strong correlations.
SMOOTH_SEED = 0


def _speedrun(arg: str | None = "smoke", **overrides):
  module = config_lib.load_config_file(str(ROOT / "configs" / "speedrun.py"))[0]
  return config_lib.apply_overrides(module.get_config(arg), overrides)


def _smooth_images(n: int, h: int = 12, w: int = 12, c: int = 3,
                   seed: int = SMOOTH_SEED) -> np.ndarray:
  """uint8 images whose neighbouring pixels and channels are correlated."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, h + 1, w + 1, 1))
  base = (base[:, 1:, 1:] + base[:, :-1, 1:] + base[:, 1:, :-1]
          + base[:, :-1, :-1])
  x = base * np.array([1.0, 0.8, 0.5]) + 0.3 * rng.normal(size=(n, h, w, c))
  return np.clip(128 + 30 * x, 0, 255).astype(np.uint8)


def _np_patches(x: np.ndarray, p: int) -> np.ndarray:
  """Every p x p window of NHWC `x` as a row in (h, w, c) order, by loops."""
  n, h, w, c = x.shape
  rows = []
  for i in range(h - p + 1):
    for j in range(w - p + 1):
      rows.append(x[:, i:i + p, j:j + p, :].reshape(n, -1))
  return np.concatenate(rows)


def _np_conv(x, w, pad=0):
  """float64 NHWC x HWIO cross-correlation, stride 1."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("nhwc,co->nhwo", x[:, i:i + oh, j:j + ow], w[i, j])
  return out


def _np_gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _np_max_pool(x, k):
  n, h, w, c = x.shape
  oh, ow = h // k, w // k
  x = x[:, :oh * k, :ow * k].reshape(n, oh, k, ow, k, c)
  return x.max(axis=(2, 4))


# --- Whitening --------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-9, 5e-4])
def test_whitening_kernel_whitens_patches(eps):
  images = _smooth_images(64)
  mean = images.mean(axis=(0, 1, 2)) / 255
  std = images.std(axis=(0, 1, 2)) / 255
  kernel = models.whitening_kernel(images, mean, std, patch=2, eps=eps)
  assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])

  x = (images / 255.0 - mean) / std
  patches = _np_patches(x, 2)
  moment = patches.T @ patches / len(patches)
  lam = np.sort(np.linalg.eigvalsh(moment))[::-1]
  assert lam[0] / lam[-1] > 50  # The test images really are correlated.
  out = patches @ kernel[..., :12].reshape(12, 12).astype(np.float64)
  got = out.T @ out / len(out)
  # Whitened: second moment diag(lambda / (lambda + eps)), identity up to
  # eps, with the largest eigenvalue's filter first.
  np.testing.assert_allclose(got, np.diag(lam / (lam + eps)), atol=2e-5)
  if eps < 1e-6:
    np.testing.assert_allclose(got, np.eye(12), atol=2e-5)


def test_whitening_kernel_refuses_float_images():
  with pytest.raises(ValueError, match="uint8"):
    models.whitening_kernel(np.zeros((2, 8, 8, 3), np.float32), 0.5, 0.2)


def _airbench_cfg(width=2, norm="batch", **kw):
  cfg = config_lib.model_config()
  cfg.name = "airbench"
  cfg.norm = norm
  cfg.width = width
  cfg.logit_scale = 1 / 9
  cfg.norm_kwargs.momentum = 0.6
  cfg.norm_kwargs.epsilon = 1e-12
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _fast_jit(fn, *args):
  """Compiled with XLA's cheapest CPU pipeline: these run once, tiny."""
  return jax.jit(fn).lower(*args).compile(
      {"xla_backend_optimization_level": 0})


def test_data_init_sets_the_whitening_conv_of_the_model():
  model = models.build_model(_airbench_cfg(whiten_images=40), 10)
  images = _smooth_images(48, 32, 32)
  mean, std = np.array([0.5, 0.45, 0.4]), np.array([0.2, 0.21, 0.22])
  x = jnp.zeros((1, 32, 32, 3))
  init = lambda x: model.init(jax.random.key(0), x)
  variables = _fast_jit(init, x)(x)
  params = model.data_init(jax.device_get(variables["params"]), images,
                           mean, std)
  np.testing.assert_array_equal(
      params["whiten"]["kernel"],
      models.whitening_kernel(images[:40], mean, std, patch=2, eps=5e-4))
  np.testing.assert_array_equal(params["whiten"]["bias"], np.zeros(24))
  # Everything else untouched.
  for name in ("block1", "block2", "block3", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, params[name],
                 jax.device_get(variables["params"][name]))
  gray = models.build_model(_airbench_cfg(), 10)
  gray_params = jax.eval_shape(lambda x: gray.init(jax.random.key(0), x),
                               jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="does not fit"):
    gray.data_init(gray_params["params"], images, mean, std)


# --- The model --------------------------------------------------------------


def test_dirac_init_is_identity_on_the_first_input_channels():
  kernel = np.asarray(models.dirac_init()(jax.random.key(0), (3, 3, 4, 6)))
  for o in range(4):
    expect = np.zeros((3, 3, 4))
    expect[1, 1, o] = 1
    np.testing.assert_array_equal(kernel[..., o], expect)
  # The rest is PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  rest = kernel[..., 4:]
  bound = 1 / math.sqrt(3 * 3 * 4)
  assert np.abs(rest).max() <= bound and np.abs(rest).max() > 0.8 * bound


def test_airbench_param_count_matches_the_reference_network():
  # airbench94 in PyTorch (BN weights count, as they are parameters there).
  w = (64, 256, 256)
  expect = 2 * 2 * 3 * 24 + 24  # whitening conv and its bias
  cin = 24
  for c in w:
    expect += 9 * cin * c + 9 * c * c + 2 * (2 * c)
    cin = c
  expect += 256 * 10
  assert expect == 1_972_792
  model = models.build_model(_speedrun(None).model, 10)
  assert models.count_params(model, (32, 32, 3)) == expect


def test_airbench_forward_matches_numpy():
  model = models.build_model(_airbench_cfg(width=2), 10)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  init = lambda x: model.init(jax.random.key(3), x)
  variables = _fast_jit(init, x)(x)
  # Non-trivial running statistics and affine parameters.
  variables = jax.tree.map(
      lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(v.dtype), variables)
  apply = lambda v, x: model.apply(v, x, train=False)
  got = _fast_jit(apply, variables, x)(variables, x)
  x = np.asarray(x)

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  s = jax.tree.map(lambda v: np.asarray(v, np.float64),
                   variables["batch_stats"])

  def bn(y, pn, sn):
    return (y - sn["mean"]) / np.sqrt(sn["var"] + 1e-12) * pn["scale"] \
        + pn["bias"]

  y = _np_gelu(_np_conv(x, p["whiten"]["kernel"]) + p["whiten"]["bias"])
  for b in ("block1", "block2", "block3"):
    pb, sb = p[b], s[b]
    y = _np_max_pool(_np_conv(y, pb["conv1"]["kernel"], pad=1), 2)
    y = _np_gelu(bn(y, pb["norm1"], sb["norm1"]))
    y = _np_conv(y, pb["conv2"]["kernel"], pad=1)
    y = _np_gelu(bn(y, pb["norm2"], sb["norm2"]))
  assert y.shape[1:3] == (3, 3)  # 31 -> 15 -> 7 -> 3, then airbench's pool 3.
  y = _np_max_pool(y, 3).reshape(2, -1)
  expect = y @ p["classifier"]["kernel"] / 9
  np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)),
                  jnp.float32)
  out = {}
  for dtype in ("float32", "bfloat16"):
    model = models.build_model(_airbench_cfg(width=2, dtype=dtype), 10)
    fn = lambda x: model.init_with_output(jax.random.key(0), x, train=False)
    out[dtype] = _fast_jit(fn, x)(x)
  logits, variables = out["bfloat16"]
  assert logits.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  # Same parameters, so the logits agree to bfloat16 precision.
  ref = np.asarray(out["float32"][0])
  np.testing.assert_allclose(logits, ref, atol=0.05 * np.abs(ref).max())
  assert not np.array_equal(logits, out["float32"][0])


# --- Optimizer: frozen params and LR multiplier -----------------------------


def _params():
  return {"whiten": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.ones(3)},
          "norm1": {"scale": jnp.ones(3), "bias": jnp.full(3, 0.2)},
          "conv": {"kernel": jnp.full((3, 3), -0.3)}}


def _opt_cfg(**kw):
  c = config_lib.optimizer_config()
  c.update({"lr": 0.1, "momentum": 0.9, "nesterov": True,
            "weight_decay": 0.01, "weight_decay_mask": "", **kw})
  return c


def test_frozen_params_never_move_and_frozen_after_stops_on_time():
  # 2 steps per epoch, whiten/bias frozen from epoch 1.5 = update 3 on.
  tx = optim.make_optimizer(
      _opt_cfg(frozen=r"(^|/)whiten/kernel$|(^|/)scale$",
               frozen_after=r"(^|/)whiten/bias$", frozen_after_epochs=1.5),
      steps_per_epoch=2, num_epochs=4)
  params = _params()
  state = tx.init(params)
  history = [params]
  for i in range(5):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1.0 + i), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  for p in history[1:]:
    np.testing.assert_array_equal(p["whiten"]["kernel"], 0.5)
    np.testing.assert_array_equal(p["norm1"]["scale"], 1.0)
  bias = [np.asarray(p["whiten"]["bias"]) for p in history]
  assert all(not np.array_equal(bias[k], bias[k + 1]) for k in range(3))
  assert all(np.array_equal(bias[3], b) for b in bias[3:])
  assert not np.array_equal(history[4]["conv"]["kernel"],
                            history[5]["conv"]["kernel"])


def test_lr_multiplier_scales_the_step_not_the_decay():
  lr, m, wd, mult = 0.1, 0.9, 0.01, 64.0
  tx = optim.make_optimizer(
      _opt_cfg(lr_multiplier_mask=r"(^|/)norm\d+/bias$", lr_multiplier=mult),
      steps_per_epoch=10, num_epochs=1)
  params = _params()
  state = tx.init(params)
  # PyTorch SGD (Nesterov, coupled decay) per airbench param group, float64.
  ref = {k: np.asarray(v, np.float64) for k, v in
         [("bias", params["norm1"]["bias"]), ("kernel", params["conv"]["kernel"])]}
  groups = {"bias": (lr * mult, wd / mult), "kernel": (lr, wd)}
  buf = {k: np.zeros_like(v) for k, v in ref.items()}
  for i in range(3):
    g = {"bias": np.full(3, 0.3 * (i + 1)), "kernel": np.full((3, 3), -0.2)}
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["norm1"]["bias"] = jnp.asarray(g["bias"], jnp.float32)
    grads["conv"]["kernel"] = jnp.asarray(g["kernel"], jnp.float32)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k, (glr, gwd) in groups.items():
      d = g[k] + gwd * ref[k]
      buf[k] = m * buf[k] + d
      ref[k] = ref[k] - glr * (d + m * buf[k])
  np.testing.assert_allclose(params["norm1"]["bias"], ref["bias"], rtol=1e-5)
  np.testing.assert_allclose(params["conv"]["kernel"], ref["kernel"],
                             rtol=1e-5)


def test_lr_multiplier_one_splits_the_decay_without_changing_it():
  # The mask splits weight decay into two masked terms; at multiplier 1
  # every param must still be decayed exactly once.
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.7), params)
  out = []
  for mask in (None, r"(^|/)norm\d+/bias$"):
    tx = optim.make_optimizer(_opt_cfg(lr_multiplier_mask=mask), 10, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    out.append(updates)
  jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
  # And the decay is there: the updates differ from the decay-free ones.
  tx = optim.make_optimizer(_opt_cfg(weight_decay=0.0), 10, 1)
  plain, _ = tx.update(grads, tx.init(params), params)
  assert not np.allclose(plain["norm1"]["bias"], out[1]["norm1"]["bias"])


@pytest.mark.parametrize("field,value,match", [
    ("lr_multiplier", 0.0, "lr_multiplier must be > 0"),
    ("frozen", "(", "frozen='\\('"),
    ("frozen_after_epochs", -1.0, "frozen_after_epochs must be >= 0"),
])
def test_optimizer_options_refused(field, value, match):
  with pytest.raises(ValueError, match=match):
    optim.validate(_opt_cfg(**{field: value}))


# --- TTA --------------------------------------------------------------------


def test_tta_is_the_weighted_mean_of_logits_of_explicit_views():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(3, 5, 6, 2)).astype(np.float32)
  w = rng.normal(size=(5 * 6 * 2, 4)).astype(np.float32)

  def apply_fn(variables, x, train):
    assert not train
    return x.reshape(x.shape[0], -1) @ variables["w"]

  def logits(x):
    return x.reshape(len(x), -1).astype(np.float64) @ w

  flip = images[:, :, ::-1]
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  down_right = padded[:, 0:5, 0:6]  # content moves one pixel down-right
  up_left = padded[:, 2:7, 2:8]
  # Reflect padding: the new first row/column mirror the second.
  np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])
  np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
  expect = {
      "": logits(images),
      "flip": 0.5 * logits(images) + 0.5 * logits(flip),
      "flip_translate": (
          0.5 * (0.5 * logits(images) + 0.5 * logits(flip))
          + 0.5 * np.mean([0.5 * logits(v) + 0.5 * logits(v[:, :, ::-1])
                           for v in (down_right, up_left)], axis=0)),
  }
  for mode, want in expect.items():
    got = augment.tta_logits(apply_fn, {"w": jnp.asarray(w)},
                           jnp.asarray(images), mode)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Flipping changes these logits, so the test can tell the views apart.
  assert not np.allclose(expect[""], expect["flip"], atol=1e-3)
  with pytest.raises(ValueError, match="valid choices"):
    augment.tta_logits(apply_fn, {"w": w}, images, "mirror")


# --- Lookahead weight average -----------------------------------------------


def _airbench_lookahead_reference(decay, every, start_epoch, power, spe,
                                  epochs, live_updates):
  """airbench94.py's loop written out: LookaheadState created at the first
  qualifying step, lerp + copy-back every `every` steps, copy-back at the
  end of each epoch. Returns the live weights after each step."""
  total = spe * epochs
  w = 0.0
  ema = None
  step = 0
  out = []
  for epoch in range(epochs):
    for _ in range(spe):
      w = w + live_updates[step]  # the optimizer step
      step += 1
      if epoch >= start_epoch and step % every == 0:
        if ema is None:
          ema = w
        else:
          rho = decay ** every * (step / total) ** power
          ema = ema + (1 - rho) * (w - ema)
          w = ema
      if step % spe == 0 and ema is not None:
        w = ema
      out.append((w, ema))
  return out


def test_lookahead_matches_airbench_loop():
  decay, every, start, power, spe, epochs = 0.9, 2, 1, 2.0, 3, 4
  la = optim.LookaheadEMA(decay=decay, every=every, start_epoch=start,
                          power=power, steps_per_epoch=spe,
                          total_steps=spe * epochs)
  assert la.first_step == 4  # first multiple of 2 in epoch 1 (steps 4..6)
  updates = np.random.default_rng(0).normal(size=spe * epochs)
  ref = _airbench_lookahead_reference(decay, every, start, power, spe,
                                      epochs, updates)
  live = {"params": jnp.zeros(()), "batch_stats": {"m": jnp.zeros(())}}
  ema = jax.tree.map(jnp.zeros_like, live)
  step_fn = jax.jit(la)
  for s in range(1, spe * epochs + 1):
    live = jax.tree.map(lambda x: x + updates[s - 1], live)
    live, ema = step_fn(jnp.int32(s), live, ema)
    want_w, want_ema = ref[s - 1]
    np.testing.assert_allclose(live["params"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(live["batch_stats"]["m"], want_w, rtol=1e-5,
                               atol=1e-6)
    if want_ema is not None:
      np.testing.assert_allclose(ema["params"], want_ema, rtol=1e-5,
                                 atol=1e-6)
  # The decay formula itself, at a few steps.
  for s in (6, 8, 12):
    np.testing.assert_allclose(float(la.rho(jnp.int32(s))),
                               decay ** every * (s / 12) ** power, rtol=1e-6)
  assert float(la.rho(jnp.int32(4))) == 0.0


def test_lookahead_options_refused():
  t = config_lib.base_config().train
  t.ema_decay = 0.95
  t.ema_every = 0
  with pytest.raises(ValueError, match="ema_every"):
    optim.make_lookahead(t, 10)
  t.ema_every = 5
  t.ema_start_epoch = t.epochs
  with pytest.raises(ValueError, match="ema_start_epoch"):
    optim.make_lookahead(t, 10)
  t.ema_decay = 0.0
  assert optim.make_lookahead(t, 10) is None


# --- The recipe -------------------------------------------------------------


def test_speedrun_config_validates_and_carries_airbench_numbers():
  c = _speedrun(None)
  validation.validate(c)
  validation.validate(_speedrun("smoke"))
  # 11.5 / (1 + 1 / 0.15) and 0.0153 / 11.5 in mean-loss units.
  assert c.optimizer.lr == pytest.approx(1.5, rel=1e-12)
  assert c.optimizer.weight_decay == pytest.approx(0.0153 / 11.5, rel=1e-12)
  assert (c.train.batch_size, c.train.epochs, c.train.label_smoothing) == (
      1024, 10, 0.2)
  assert c.train.tta == "flip_translate" and c.train.ema_decay == 0.95
  # airbench's LR peak: step int(0.23 * 476) = 109 of 48-step epochs.
  from jaxreg import schedules
  sched = schedules.make_schedule(c.optimizer.schedule, 1.0, 48, 10)
  assert float(sched(109)) == pytest.approx(1.0)
  module = config_lib.load_config_file(str(ROOT / "configs" / "speedrun.py"))[0]
  assert [v["seed"] for v in module.get_sweep()] == list(range(10))
  assert module.get_sweep("smoke") == [{"seed": 0}]
  with pytest.raises(ValueError, match="valid args: smoke"):
    module.get_config("fast")


@pytest.mark.parametrize("key,value,match", [
    ("train.tta", "mirror", "train.tta='mirror'"),
    ("train.ema_start_epoch", 2, "ema_start_epoch=2"),
    ("model.dtype", "float8", "model.dtype='float8'"),
    ("optimizer.lr_multiplier", -1.0, "lr_multiplier"),
])
def test_bad_speedrun_overrides_refused_at_build_time(key, value, match):
  with pytest.raises(ValueError, match=match):
    validation.validate(_speedrun("smoke", **{key: value}))


def _random_cifar(n_train=256, n_test=100) -> data_lib.Dataset:
  rng = np.random.default_rng(0)
  train_x = _smooth_images(n_train, 32, 32, seed=1)
  test_x = _smooth_images(n_test, 32, 32, seed=2)
  scaled = train_x / 255.0
  return data_lib.Dataset(
      name="cifar10", train_images=train_x,
      train_labels=rng.integers(0, 10, n_train).astype(np.int32),
      val_images=train_x[:0], val_labels=np.zeros(0, np.int32),
      test_images=test_x,
      test_labels=rng.integers(0, 10, n_test).astype(np.int32),
      mean=scaled.mean(axis=(0, 1, 2)).astype(np.float32),
      std=scaled.std(axis=(0, 1, 2)).astype(np.float32),
      num_classes=10, class_names=tuple(str(i) for i in range(10)))


@pytest.fixture(scope="module")
def trainer():
  # Smoke recipe at 2 steps per epoch: averaging every 3 steps from epoch 1
  # (steps 3, 6), whitening bias frozen from epoch 1 (update 2) on.
  config = _speedrun("smoke", **{
      "dataset.train_size": 256, "train.batch_size": 128, "train.epochs": 4,
      "train.eval_batch_size": 100, "train.ema_every": 3,
      "train.ema_start_epoch": 1, "model.whiten_images": 200})
  ds = _random_cifar()
  t = engine_lib.build(config, ds, steps_lib.make_mesh(1))
  (state,), seconds = t.init([jax.random.key(0)], [jax.random.key(1)])
  t.compile([state])
  return t, state, seconds[0]


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_trainer_sets_whitening_from_data_and_keeps_frozen_params(trainer):
  t, state0, data_init_s = trainer
  ds = t.steps.data.host
  np.testing.assert_array_equal(
      state0.params["whiten"]["kernel"],
      models.whitening_kernel(ds.train_images[:200], ds.mean, ds.std))
  assert data_init_s > 0
  before = _flat(jax.device_get(state0.params))
  # Donation consumes the state: train on a copy.
  states = [jax.tree.map(jnp.copy, state0)]
  history = [before]
  for epoch in (1, 2):
    states, _, _ = train.run_epoch(t, states, epoch, 2)
    history.append(_flat(jax.device_get(states[0].params)))
  state = states[0]
  for h in history[1:]:
    for k, v in h.items():
      if k == "whiten/kernel" or k.endswith("/scale"):
        np.testing.assert_array_equal(v, before[k], err_msg=k)
  # The whitening bias trains in epoch 0 (update 1 of 2) only.
  assert not np.array_equal(history[1]["whiten/bias"], before["whiten/bias"])
  np.testing.assert_array_equal(history[2]["whiten/bias"],
                                history[1]["whiten/bias"])
  for k in ("block2/norm1/bias", "block3/conv2/kernel", "classifier/kernel"):
    assert not np.array_equal(history[2][k], history[1][k]), k
  # Epoch 2 ends at step 4, past the first average (step 3): the live
  # weights and statistics are the average.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(state.ema["params"]))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.batch_stats),
               jax.device_get(state.ema["batch_stats"]))


def test_trainer_evaluates_with_flip_translate_tta(trainer):
  t, state, _ = trainer
  preds, losses = t.predictions(state, "test")
  ds = t.steps.data.host
  x = (ds.test_images / 255.0 - ds.mean) / ds.std
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = jnp.asarray(x, jnp.float32)

  def both(variables, x):
    return (augment.tta_logits(state.apply_fn, variables, x, "flip_translate"),
            state.apply_fn(variables, x, train=False))

  logits, plain = _fast_jit(both, variables, x)(variables, x)
  np.testing.assert_array_equal(preds, np.argmax(logits, -1))
  ref = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                            ds.test_labels[:, None], 1)[:, 0]
  np.testing.assert_allclose(losses, ref, rtol=1e-4, atol=1e-5)
  assert not np.allclose(logits, plain, atol=1e-4)


def test_airbench_one_step_lowers_the_loss_on_its_batch():
  model = models.build_model(_airbench_cfg(width=2), 10)
  images = _smooth_images(16, 32, 32)
  x = jnp.asarray((images / 255.0 - 0.5) / 0.2, jnp.float32)
  labels = jax.nn.one_hot(np.arange(16) % 10, 10)
  init = lambda x: model.init(jax.random.key(0), x)
  variables = _fast_jit(init, x[:1])(x[:1])
  params = model.data_init(jax.device_get(variables["params"]), images,
                           0.5, 0.2)

  def loss(p):
    logits, _ = model.apply({"params": p,
                             "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy(logits, labels).mean()

  def step(p):
    value, g = jax.value_and_grad(loss)(p)
    return value, jax.tree.map(lambda a, b: a - 0.5 * b, p, g)

  step = _fast_jit(step, params)
  l0, params = step(params)
  l1, _ = step(params)
  assert np.isfinite(float(l0)) and float(l1) < float(l0)


def test_smoke_runs_end_to_end_on_mocked_cifar10(tmp_path):
  import tensorflow_datasets as tfds
  config = _speedrun("smoke", **{"dataset.data_dir": str(tmp_path / "tfds"),
                                 "dataset.train_size": 256,
                                 "dataset.test_size": 100,
                                 "train.eval_batch_size": 100})
  data_lib.loading.load_splits.cache_clear()
  try:
    with tfds.testing.mock_data(num_examples=256):
      summary = train.train_and_evaluate(config, tmp_path / "run")
  finally:
    data_lib.loading.load_splits.cache_clear()
  assert summary["status"] == "completed", summary.get("error")
  assert summary["dataset"] == "cifar10" and summary["model"] == "airbench"
  assert summary["epochs_completed"] == 2
  assert summary["data_init_time_s"] > 0 and summary["train_time_s"] > 0
  assert np.asarray(summary["test_confusion"]).sum() == 100
  rows = [json.loads(l) for l in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]
  assert all(r["eval_time_s"] > 0 and np.isfinite(r["train_loss"])
             for r in rows)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["train"]["tta"] == "flip_translate"
  assert saved["model"]["name"] == "airbench"
