"""Cross-entropy and one-hot against float64 NumPy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import losses

B, K = 16, 10


def _ref_ce(logits, targets, smoothing=0.0):
  logits = np.asarray(logits, np.float64)
  targets = np.asarray(targets, np.float64)
  targets = (1 - smoothing) * targets + smoothing / targets.shape[-1]
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -(targets * log_softmax).sum(-1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  # Large logits: a naive exp would overflow in float32.
  logits = rng.normal(size=(B, K)).astype(np.float32) * 40
  labels = rng.integers(0, K, size=B)
  return logits, labels


def test_one_hot(data):
  _, labels = data
  y = losses.one_hot(jnp.asarray(labels), K)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), np.eye(K)[labels])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_labels(data, smoothing):
  logits, labels = data
  y = losses.one_hot(jnp.asarray(labels), K)
  got = losses.cross_entropy(jnp.asarray(logits), y, smoothing)
  assert got.shape == (B,) and got.dtype == jnp.float32
  want = _ref_ce(logits, np.eye(K)[labels], smoothing)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_smoothing_is_pytorch_convention():
  # Uniform logits: loss is log K whatever the targets or smoothing.
  logits = jnp.zeros((2, K))
  y = losses.one_hot(jnp.array([1, 3]), K)
  np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits, y, 0.3)),
                             np.log(K), rtol=1e-6)
  # Logits favouring class 0 by d: closed form of the smoothed target loss.
  d, a = 2.0, 0.2
  logits = jnp.zeros((1, K)).at[0, 0].set(d)
  lse = np.log(np.exp(d) + K - 1)
  want = (1 - a + a / K) * (lse - d) + (K - 1) * (a / K) * lse
  got = losses.cross_entropy(logits, losses.one_hot(jnp.array([0]), K), a)
  np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-6)


def test_soft_labels_from_mixup(data):
  logits, labels = data
  lam = np.random.default_rng(1).uniform(size=(B, 1))
  y = lam * np.eye(K)[labels] + (1 - lam) * np.eye(K)[labels[::-1]]
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), _ref_ce(logits, y), rtol=1e-5,
                             atol=1e-4)


def test_gradient_is_softmax_minus_target(data):
  logits, labels = data
  logits = logits / 10
  y = np.eye(K)[labels]
  g = jax.grad(lambda z: losses.cross_entropy(z, jnp.asarray(y, jnp.float32))
               .sum())(jnp.asarray(logits))
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g), p - y, atol=1e-6)


def test_bfloat16_logits_computed_in_float32(data):
  logits, labels = data
  lb = jnp.asarray(logits, jnp.bfloat16)
  got = losses.cross_entropy(lb, losses.one_hot(jnp.asarray(labels), K))
  assert got.dtype == jnp.float32
  want = _ref_ce(np.asarray(lb, np.float64), np.eye(K)[labels])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_bad_inputs():
  with pytest.raises(ValueError, match="same shape"):
    losses.cross_entropy(jnp.zeros((2, K)), jnp.zeros((2,)))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy(jnp.zeros((2, K)), jnp.zeros((2, K)), 1.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy(jnp.zeros((2, K)), jnp.zeros((2, K)), -0.1)
  with pytest.raises(ValueError, match="num_classes"):
    losses.one_hot(jnp.array([0]), 0)
