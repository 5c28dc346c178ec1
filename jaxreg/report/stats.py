"""Statistics over seeds: estimates with confidence intervals, and tests of
each variant against a baseline, corrected for the number of comparisons.

Pure functions of plain numbers (NumPy and scipy.stats only), so they can be
checked against values computed by hand:
  estimate       mean, sample std (ddof=1) and the t confidence interval
  censored       the same for a time to target, where None means "never"
  compare        one variant against the baseline: Welch's t-test, the
                 Welch t interval and a bootstrap interval of the difference
  holm           Holm's step-down adjustment of a family of p-values
  compare_all    every variant against the baseline for one metric, Holm
                 over the study's variants, with a verdict each

"Never reached the target" is a censored observation: every run of a study
stops after the same number of epochs, so a "never" is later than every
time that was reached. A mean of such values does not exist; `censored`
reports how many runs reached the target and the median (finite when more
than half did), and `compare` ranks "never" last in a Mann-Whitney U test
instead of a t-test.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
ALPHA = 1.0 - LEVEL
# Resamples of the bootstrap: the Monte Carlo error of a 2.5% endpoint is
# then about 3% of the difference's standard error (tests/test_stats.py).
NUM_RESAMPLES = 9999
# Exact rank tests up to this many splits (8 + 8 seeds: 12,870).
PERMUTATIONS = 100_000
BETTER, WORSE, SAME = "better", "worse", "not distinguishable"


@dataclasses.dataclass(frozen=True)
class Metric:
  """A final metric the report compares."""
  key: str
  label: str
  higher_is_better: bool
  censored: bool = False  # None values mean "never" (time to target).
  scale: float = 1.0  # Display factor (100 for accuracies in %).


METRICS = (
    Metric("test_accuracy", "test accuracy (%)", True, scale=100.0),
    Metric("val_accuracy", "val accuracy (%)", True, scale=100.0),
    Metric("test_loss", "test loss", False),
    Metric("test_macro_f1", "test macro F1 (%)", True, scale=100.0),
    Metric("time_to_target_s", "time to target (s)", False, censored=True),
    Metric("epochs_to_target", "epochs to target", False, censored=True),
)
METRICS_BY_KEY = {m.key: m for m in METRICS}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A metric over seeds. NaN where undefined (std and CI need n >= 2; the
  mean of a censored sample with a "never" does not exist)."""
  n: int  # Runs with a value (for censored metrics: runs, "never" included).
  mean: float
  std: float
  lo: float  # The t confidence interval of the mean.
  hi: float
  reached: int  # Runs that reached the target (= n when not censored).
  median: float  # inf when at most half reached the target.


def _nan_estimate(n: int, reached: int, median: float) -> Estimate:
  return Estimate(n, math.nan, math.nan, math.nan, math.nan, reached, median)


def estimate(values: Sequence[float], level: float = LEVEL) -> Estimate:
  """Mean, sample std (ddof=1) and the t interval of the mean,
  mean +- t_{(1+level)/2, n-1} * std / sqrt(n)."""
  a = np.asarray(list(values), np.float64)
  n = int(a.size)
  if n == 0:
    return _nan_estimate(0, 0, math.nan)
  mean, median = float(a.mean()), float(np.median(a))
  if n < 2:
    return Estimate(1, mean, math.nan, math.nan, math.nan, 1, median)
  std = float(a.std(ddof=1))
  half = float(sps.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
  return Estimate(n, mean, std, mean - half, mean + half, n, median)


def censored(values: Sequence[float | None], level: float = LEVEL
             ) -> Estimate:
  """`estimate` when every run reached the target; with a "never" (None),
  only the count reached and the median (never = +inf) are defined."""
  reached = [float(v) for v in values if v is not None]
  if len(reached) == len(values):
    return estimate(reached, level)
  ranked = [math.inf if v is None else float(v) for v in values]
  median = float(np.median(ranked)) if ranked else math.nan
  return _nan_estimate(len(values), len(reached),
                       median if not math.isnan(median) else math.inf)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A variant against the baseline: difference variant - baseline."""
  diff: float  # Difference of means (NaN when a sample is censored).
  lo: float  # Welch t interval of the difference.
  hi: float
  boot_lo: float  # Bootstrap percentile interval of the difference.
  boot_hi: float
  p: float  # Two-sided; NaN when not testable.
  test: str  # "welch", "mann-whitney" or "" (not testable).
  p_holm: float = math.nan
  verdict: str = ""


def _mean_diff(x, y, axis=-1):
  return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_diff(a: Sequence[float], b: Sequence[float],
                   level: float = LEVEL, seed: int = 0,
                   num_resamples: int = NUM_RESAMPLES) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(a) - mean(b), each sample
  resampled on its own; seeded, so a report is reproducible."""
  res = sps.bootstrap((np.asarray(a, np.float64), np.asarray(b, np.float64)),
                      _mean_diff, n_resamples=num_resamples,
                      confidence_level=level, method="percentile",
                      vectorized=True, rng=np.random.default_rng(seed))
  return (float(res.confidence_interval.low),
          float(res.confidence_interval.high))


def compare(a: Sequence[float | None], b: Sequence[float | None],
            level: float = LEVEL, seed: int = 0) -> Comparison:
  """Variant sample `a` against baseline sample `b` (None = never).

  Welch's two-sided t-test (unequal variances) with its interval of the
  difference and a bootstrap interval; for a censored sample, Mann-Whitney U
  with "never" ranked after every reached value. Not testable (p NaN) with
  fewer than 2 values on a side, or with no spread in either sample.
  """
  nan = math.nan
  if any(v is None for v in (*a, *b)):
    if len(a) < 2 or len(b) < 2:
      return Comparison(nan, nan, nan, nan, nan, nan, "")
    ra = [math.inf if v is None else v for v in a]
    rb = [math.inf if v is None else v for v in b]
    if len(set(ra) | set(rb)) == 1:  # All never (or all equal): no ranks.
      return Comparison(nan, nan, nan, nan, nan, nan, "")
    # The nevers tie; a permutation distribution is exact with ties (all
    # C(n_a + n_b, n_a) splits are enumerated up to PERMUTATIONS).
    p = float(sps.mannwhitneyu(ra, rb, alternative="two-sided", method=(
        sps.PermutationMethod(n_resamples=PERMUTATIONS,
                              rng=np.random.default_rng(seed)))).pvalue)
    return Comparison(nan, nan, nan, nan, nan, p, "mann-whitney")
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.size < 2 or y.size < 2:
    diff = float(x.mean() - y.mean()) if x.size and y.size else nan
    return Comparison(diff, nan, nan, nan, nan, nan, "")
  diff = float(x.mean() - y.mean())
  if x.std() == 0 and y.std() == 0:
    return Comparison(diff, diff, diff, diff, diff, nan, "")
  res = sps.ttest_ind(x, y, equal_var=False)
  ci = res.confidence_interval(level)
  boot = bootstrap_diff(x, y, level, seed)
  return Comparison(diff, float(ci.low), float(ci.high), *boot,
                    float(res.pvalue), "welch")


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the input order.

  With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted
  p_(i) is max over j <= i of min(1, (m - j + 1) * p_(j)). NaN entries
  (comparisons that could not be tested) stay NaN and do not count in m.
  """
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(~np.isnan(p))
  m = idx.size
  running = 0.0
  for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return out.tolist()


def verdict(p_holm: float, sign: float, metric: Metric,
            alpha: float = ALPHA) -> str:
  """better / worse / not distinguishable, from the Holm-adjusted p and the
  sign of variant - baseline."""
  if math.isnan(p_holm):
    return "not testable"
  if p_holm >= alpha or sign == 0:
    return SAME
  return BETTER if (sign > 0) == metric.higher_is_better else WORSE


def _sign(a: Sequence[float | None], b: Sequence[float | None]) -> float:
  """Sign of a - b: of the means, or with a "never" of the medians
  (never = +inf), which is what a rank test compares."""
  def centre(v):
    if any(x is None for x in v):
      return float(np.median([math.inf if x is None else x for x in v]))
    return float(np.mean(v))
  ca, cb = centre(a), centre(b)
  return 0.0 if ca == cb else (1.0 if ca > cb else -1.0)


def compare_pairs(pairs: Mapping[str, tuple[Sequence[float | None],
                                            Sequence[float | None]]],
                  metric: Metric, level: float = LEVEL
                  ) -> dict[str, Comparison]:
  """Each (variant sample, its baseline sample), Holm over the family.

  Args:
    pairs: variant label -> (its values over seeds, its baseline's values);
      None = never reached, for censored metrics.
    metric: what the values are (direction of "better").
    level: confidence level; the tests use alpha = 1 - level.
  """
  # Seeded per variant (by position) so reports are reproducible.
  raw = {k: compare(a, b, level, seed=i)
         for i, (k, (a, b)) in enumerate(pairs.items())}
  adjusted = holm([c.p for c in raw.values()])
  return {k: dataclasses.replace(c, p_holm=p_adj, verdict=verdict(
      p_adj, _sign(*pairs[k]), metric, 1 - level))
          for (k, c), p_adj in zip(raw.items(), adjusted)}


def compare_all(samples: Mapping[str, Sequence[float | None]], baseline: str,
                metric: Metric, level: float = LEVEL
                ) -> dict[str, Comparison]:
  """Every sample but the baseline against it (`compare_pairs`)."""
  if baseline not in samples:
    raise ValueError(f"baseline {baseline!r} is not among {list(samples)}")
  return compare_pairs({k: (v, samples[baseline]) for k, v in samples.items()
                        if k != baseline}, metric, level)
