"""Host-side evaluation metrics, computed in NumPy from per-example outputs.

The train loop hands over integer labels and predictions (the argmax of the
logits) for a whole split, plus optionally per-example losses; everything
here is exact counting in int64/float64, so it is cheap next to the forward
passes that produced the inputs and needs no accelerator.

Conventions follow scikit-learn (without depending on it):

* `micro_f1` and `macro_f1` equal `sklearn.metrics.f1_score(labels, preds,
  labels=range(num_classes), average=..., zero_division=0)`. Every one of
  the `num_classes` classes enters the macro average, including a class that
  appears neither in `labels` nor in `preds`; its F1 is 0/0 and counts as 0
  (zero_division=0). On a full test set every class is present, so this only
  matters for tiny evaluation sets, where it makes macro F1 pessimistic.
* For single-label multiclass data micro F1 equals accuracy; it is still
  computed from the pooled counts so that the identity is checked, not
  assumed.
* `per_class_accuracy` is the recall of each class (the diagonal of the
  row-normalised confusion matrix); a class with no true examples gets 0.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _as_int_vector(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    hint = (" (pass the argmax of the logits, not the logits)"
            if name == "preds" and a.ndim == 2 else "")
    raise ValueError(f"{name} must be a 1-D array of class indices, got shape "
                     f"{a.shape}{hint}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
      raise ValueError(f"{name} must hold integer class indices, got dtype "
                       f"{a.dtype}")
  return a.astype(np.int64)


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """Counts [num_classes, num_classes]: rows true classes, cols predicted."""
  labels = _as_int_vector(labels, "labels")
  preds = _as_int_vector(preds, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels and preds differ in length: {labels.shape[0]} vs "
                     f"{preds.shape[0]}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  for name, a in (("labels", labels), ("preds", preds)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                       f"[{a.min()}, {a.max()}]; check num_classes")
  flat = labels * num_classes + preds
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(
      num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def classification_metrics(labels: Any,
                           preds: Any,
                           num_classes: int,
                           losses: Any | None = None,
                           mask: Any | None = None) -> dict[str, Any]:
  """Accuracy, F1 scores, per-class recall and confusion for one split.

  Args:
    labels: int array [N], true classes.
    preds: int array [N], predicted classes (argmax of the logits).
    num_classes: number of classes K; labels and preds must lie in [0, K).
    losses: optional float array [N] of per-example losses; their mean is
      returned as "loss" (None when not given).
    mask: optional bool array [N]; only examples where it is True count.
      Lets the caller pass a padded last batch as is.

  Returns:
    A JSON-serialisable dict: "num_examples" (int), "accuracy", "loss",
    "micro_f1", "macro_f1" (floats in [0, 1]; NaN accuracy/F1 for an empty
    split), "per_class_accuracy" (list of K floats, recall per class),
    "confusion" (K x K list of int lists, rows true, cols predicted).

  Raises:
    ValueError: on shape mismatches, non-integer classes or classes outside
      [0, num_classes).
  """
  labels = _as_int_vector(labels, "labels")
  preds = _as_int_vector(preds, "preds")
  if losses is not None:
    losses = np.asarray(losses, np.float64)
    if losses.shape != labels.shape:
      raise ValueError(f"losses must have one value per example: shape "
                       f"{losses.shape} vs labels {labels.shape}")
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != labels.shape or mask.dtype != np.bool_:
      raise ValueError(f"mask must be a bool array shaped like labels "
                       f"{labels.shape}, got {mask.dtype} {mask.shape}")
    labels, preds = labels[mask], preds[mask]
    if losses is not None:
      losses = losses[mask]
  conf = confusion_matrix(labels, preds, num_classes)
  n = int(labels.shape[0])
  tp = np.diag(conf).astype(np.float64)
  support = conf.sum(axis=1)    # true examples per class
  predicted = conf.sum(axis=0)  # predictions per class
  fp = predicted - tp
  fn = support - tp
  # F1 = 2TP / (2TP + FP + FN): the same as 2PR/(P+R) wherever that is
  # defined, and 0/0 -> 0 exactly where sklearn's zero_division=0 applies.
  f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
  micro = float(_safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
  accuracy = float(tp.sum() / n) if n else math.nan
  loss = None
  if losses is not None:
    loss = float(losses.mean()) if n else math.nan
  return {
      "num_examples": n,
      "accuracy": accuracy,
      "loss": loss,
      "micro_f1": micro if n else math.nan,
      "macro_f1": float(f1.mean()) if n else math.nan,
      "per_class_accuracy": [float(v) for v in _safe_div(tp, support)],
      "confusion": conf.astype(int).tolist(),
  }


def time_to_target(history: Sequence[Mapping[str, Any]],
                   target: float | None,
                   key: str = "test_accuracy"
                   ) -> tuple[float | None, int | None]:
  """Training time and epochs until `history[key]` first reaches `target`.

  Args:
    history: per-epoch records as in metrics.jsonl, in epoch order; each has
      "train_time_s" (cumulative, compile excluded) and optionally "epoch"
      (1-based; the position in the list is used when absent).
    target: threshold on `key`, on the same scale (fractions, e.g. 0.87).
      None means no target: (None, None).
    key: the metric compared with the target.

  Returns:
    (train_time_s, epoch) of the first epoch with value >= target, or
    (None, None) when no epoch reaches it. Records without the key, or with
    a non-numeric or NaN value, never count as reaching it.
  """
  if target is None:
    return None, None
  target = float(target)
  if math.isnan(target):
    raise ValueError("target is NaN; pass a number such as 0.87, or None")
  for i, rec in enumerate(history):
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value,
                                                 (int, float, np.number)):
      continue
    if value >= target:  # NaN compares False, so a diverged epoch never counts.
      if "train_time_s" not in rec:
        raise ValueError(f"epoch record {i} reaches the target but has no "
                         f"train_time_s: {sorted(rec)}")
      return float(rec["train_time_s"]), int(rec.get("epoch", i + 1))
  return None, None


def _quantile_key(q: float) -> str:
  return f"q{int(q):02d}" if float(q).is_integer() else f"q{q:g}"


def feature_quantiles(x: Any,
                      qs: Iterable[float] = (1, 20, 80, 99)
                      ) -> dict[str, float]:
  """Percentiles of all entries of a feature tensor.

  Args:
    x: array of any shape (e.g. NHWC activations of one layer).
    qs: percentiles in [0, 100].

  Returns:
    {"q01": ..., "q20": ..., ...}: the key is "q" plus the percentile padded
    to two digits; values use NumPy's default linear interpolation in
    float64.
  """
  qs = [float(q) for q in qs]
  for q in qs:
    if not 0.0 <= q <= 100.0:
      raise ValueError(f"percentiles must lie in [0, 100], got {q}")
  a = np.asarray(x, np.float64).ravel()
  if a.size == 0:
    raise ValueError("feature_quantiles needs a non-empty array")
  values = np.percentile(a, qs)
  return {_quantile_key(q): float(v) for q, v in zip(qs, values)}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1) of repeated measurements.

  One value gives std 0 (there is no spread to estimate, and the report then
  shows the value alone). Raises ValueError for an empty input.
  """
  a = np.asarray(list(values), np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"mean_std needs a non-empty 1-D sequence, got shape "
                     f"{a.shape}")
  if a.size == 1:
    return float(a[0]), 0.0
  return float(a.mean()), float(a.std(ddof=1))
