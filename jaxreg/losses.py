"""Classification loss: softmax cross-entropy on (soft) label distributions.

Labels are probability vectors, not class ids, because mixup produces convex
combinations of one-hot rows; `one_hot` converts class ids first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """Integer class ids [...] -> float32 one-hot rows [..., num_classes]."""
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got "
                     f"{num_classes}")
  return jax.nn.one_hot(labels, int(num_classes), dtype=jnp.float32)


def cross_entropy(logits: jax.Array, labels_onehot: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, -sum_k y_k log softmax(logits)_k.

  Args:
    logits: [B, K] unnormalized scores (any float dtype; computed in float32
      so bfloat16 logits do not lose the log-sum-exp).
    labels_onehot: [B, K] target distributions (one-hot or soft, rows sum to
      1).
    label_smoothing: alpha in [0, 1): targets become (1 - alpha) * y +
      alpha / K, the PyTorch / optax.smooth_labels convention.

  Returns:
    [B] float32 losses.

  Raises:
    ValueError: when shapes differ or label_smoothing is outside [0, 1).
  """
  if logits.shape != labels_onehot.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels_onehot.shape} "
                     "must have the same shape [batch, num_classes]; convert "
                     "class ids with losses.one_hot")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got "
                     f"{label_smoothing}")
  labels = labels_onehot.astype(jnp.float32)
  if label_smoothing > 0:
    labels = optax.smooth_labels(labels, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
