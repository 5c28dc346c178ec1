"""Tests for jaxreg.metrics against hand-computed numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jaxreg import metrics

# Four classes; class 3 is never predicted.
#   true 0 -> preds 0,0,1   true 1 -> preds 1,1,0
#   true 2 -> preds 1,2     true 3 -> preds 1,0
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
PREDS = [0, 0, 1, 1, 1, 0, 1, 2, 1, 0]
CONFUSION = [[2, 1, 0, 0],
             [1, 2, 0, 0],
             [0, 1, 1, 0],
             [1, 1, 0, 0]]
# F1 = 2TP / (2TP + FP + FN) per class, worked out by hand:
#   class 0: TP 2, FP 2, FN 1 -> 4/7
#   class 1: TP 2, FP 3, FN 1 -> 4/8
#   class 2: TP 1, FP 0, FN 1 -> 2/3
#   class 3: TP 0, FP 0, FN 2 -> 0
MACRO_F1 = (4 / 7 + 1 / 2 + 2 / 3 + 0) / 4  # = 73/168
RECALL = [2 / 3, 2 / 3, 1 / 2, 0.0]


def test_hand_computed_fixture():
  m = metrics.classification_metrics(LABELS, PREDS, num_classes=4)
  assert m["num_examples"] == 10
  assert m["confusion"] == CONFUSION
  assert m["accuracy"] == pytest.approx(0.5)
  # Micro F1 pools TP=5, FP=5, FN=5: 10 / 20.
  assert m["micro_f1"] == pytest.approx(0.5)
  assert m["macro_f1"] == pytest.approx(73 / 168)
  assert m["macro_f1"] == pytest.approx(MACRO_F1)
  assert m["per_class_accuracy"] == pytest.approx(RECALL)
  assert m["loss"] is None


def test_class_absent_from_labels_and_preds_counts_as_zero():
  # Class 2 never occurs: its F1 is 0/0, which counts as 0 (sklearn
  # zero_division=0 with labels=range(K)), so the macro mean is over 3.
  m = metrics.classification_metrics([0, 1, 1], [0, 1, 0], num_classes=3)
  assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
  # class 0: 2/(2+1+0), class 1: 2/(2+0+1), class 2: 0.
  assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
  assert m["micro_f1"] == pytest.approx(2 / 3)
  assert m["per_class_accuracy"] == pytest.approx([1.0, 0.5, 0.0])


def test_perfect_predictions():
  m = metrics.classification_metrics([2, 0, 1, 1], [2, 0, 1, 1], 3)
  assert m["accuracy"] == 1.0
  assert m["micro_f1"] == 1.0
  assert m["macro_f1"] == 1.0
  assert m["per_class_accuracy"] == [1.0, 1.0, 1.0]


def test_losses_and_mask():
  losses = np.arange(10, dtype=np.float32)
  m = metrics.classification_metrics(np.array(LABELS), np.array(PREDS), 4,
                                     losses=losses)
  assert m["loss"] == pytest.approx(4.5)
  # A padded batch: two junk examples appended and masked out must not change
  # anything.
  labels = np.array(LABELS + [3, 3])
  preds = np.array(PREDS + [3, 3])
  mask = np.array([True] * 10 + [False, False])
  m2 = metrics.classification_metrics(labels, preds, 4,
                                      losses=np.append(losses, [100., 100.]),
                                      mask=mask)
  assert m2["confusion"] == CONFUSION
  assert m2["macro_f1"] == pytest.approx(MACRO_F1)
  assert m2["loss"] == pytest.approx(4.5)
  assert m2["num_examples"] == 10


@pytest.mark.parametrize("labels,preds,k,match", [
    ([0, 1], [0], 2, "differ in length"),
    ([0, 1], [[0.1, 0.9], [0.8, 0.2]], 2, "argmax"),
    ([0, 2], [0, 1], 2, r"labels must lie in \[0, 2\)"),
    ([0, 1], [0, -1], 2, "preds must lie"),
    ([0, 1], [0.5, 1.0], 2, "integer class indices"),
])
def test_bad_input_raises(labels, preds, k, match):
  with pytest.raises(ValueError, match=match):
    metrics.classification_metrics(labels, preds, k)


def test_result_is_json_serialisable():
  import json
  m = metrics.classification_metrics(np.array(LABELS, np.int32),
                                     np.array(PREDS, np.int32), 4,
                                     losses=np.ones(10, np.float32))
  assert json.loads(json.dumps(m)) == m


HISTORY = [
    {"epoch": 1, "train_time_s": 10.0, "test_accuracy": 0.50,
     "val_accuracy": 0.6},
    {"epoch": 2, "train_time_s": 21.0, "test_accuracy": 0.88,
     "val_accuracy": 0.7},
    {"epoch": 3, "train_time_s": 33.0, "test_accuracy": 0.86,
     "val_accuracy": 0.9},
]


def test_time_to_target():
  assert metrics.time_to_target(HISTORY, 0.87) == (21.0, 2)
  # The threshold itself counts as reached.
  assert metrics.time_to_target(HISTORY, 0.88) == (21.0, 2)
  assert metrics.time_to_target(HISTORY, 0.5) == (10.0, 1)
  assert metrics.time_to_target(HISTORY, 0.89) == (None, None)
  assert metrics.time_to_target(HISTORY, 0.85, key="val_accuracy") == (33.0, 3)
  assert metrics.time_to_target(HISTORY, None) == (None, None)
  assert metrics.time_to_target([], 0.1) == (None, None)


def test_time_to_target_skips_nan_and_missing_and_uses_position():
  history = [{"train_time_s": 1.0, "test_accuracy": float("nan")},
             {"train_time_s": 2.0},
             {"train_time_s": 3.0, "test_accuracy": "nan"},
             {"train_time_s": 4.0, "test_accuracy": 0.9}]
  assert metrics.time_to_target(history, 0.1) == (4.0, 4)
  with pytest.raises(ValueError, match="NaN"):
    metrics.time_to_target(history, float("nan"))


def test_feature_quantiles():
  # 0..100: the p-th percentile is exactly p under linear interpolation.
  q = metrics.feature_quantiles(np.arange(101.0))
  assert q == {"q01": 1.0, "q20": 20.0, "q80": 80.0, "q99": 99.0}
  x = np.random.default_rng(0).normal(size=(4, 5, 5, 3)).astype(np.float32)
  q = metrics.feature_quantiles(x, qs=(1, 20, 80, 99, 50))
  ref = np.percentile(x.astype(np.float64).ravel(), [1, 20, 80, 99, 50])
  assert list(q) == ["q01", "q20", "q80", "q99", "q50"]
  np.testing.assert_allclose(list(q.values()), ref, rtol=1e-12)
  with pytest.raises(ValueError, match=r"\[0, 100\]"):
    metrics.feature_quantiles(x, qs=(101,))
  with pytest.raises(ValueError, match="non-empty"):
    metrics.feature_quantiles(np.zeros((0, 3)))


def test_mean_std():
  # Squared deviations from 2.5 sum to 5; ddof=1 divides by 3.
  mean, std = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
  assert mean == pytest.approx(2.5)
  assert std == pytest.approx(math.sqrt(5 / 3))
  assert metrics.mean_std([0.7]) == (0.7, 0.0)
  assert metrics.mean_std(np.array([2.0, 2.0])) == (2.0, 0.0)
  with pytest.raises(ValueError, match="non-empty"):
    metrics.mean_std([])
