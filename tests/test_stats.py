"""jaxreg.report.stats against values computed by hand.

The t distribution's CDF is computed here independently of scipy: Simpson's
rule on its density (from math.lgamma) and bisection for quantiles. With
20,000 intervals on [0, |t|] (|t| < 10) Simpson's error bound is below 1e-12
for this smooth density, so probabilities and quantiles agree with scipy's
to 1e-9 (the tolerance used).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from jaxreg.report import stats

TOL = 1e-9  # Simpson + bisection to 1e-12 (module docstring), with margin.


def t_pdf(x: np.ndarray, df: float) -> np.ndarray:
  c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2))
  return c / math.sqrt(df * math.pi) * (1 + x * x / df) ** (-(df + 1) / 2)


def t_cdf(x: float, df: float, n: int = 20000) -> float:
  """P(T <= x) by Simpson's rule on [0, |x|] and symmetry."""
  grid = np.linspace(0.0, abs(x), n + 1)
  w = np.ones(n + 1)
  w[1:-1:2], w[2:-1:2] = 4, 2
  half = float((w * t_pdf(grid, df)).sum() * abs(x) / (3 * n))
  return 0.5 + half if x >= 0 else 0.5 - half


def t_ppf(q: float, df: float) -> float:
  lo, hi = 0.0, 50.0
  for _ in range(60):  # 50 / 2**60: far below TOL.
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
  return (lo + hi) / 2


def test_t_cdf_reference_matches_known_values():
  # Textbook table values (4 df: t_0.975 = 2.776445; 1 df is Cauchy).
  assert t_ppf(0.975, 4) == pytest.approx(2.7764451, abs=1e-6)
  assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=TOL)  # 1/2 + atan(1)/pi


def test_estimate_is_the_t_interval_by_hand():
  e = stats.estimate([1.0, 2.0, 3.0, 4.0, 5.0])
  half = t_ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)
  assert (e.n, e.mean, e.reached) == (5, 3.0, 5)
  assert e.std == pytest.approx(math.sqrt(2.5), rel=1e-15)
  assert e.lo == pytest.approx(3.0 - half, abs=TOL)
  assert e.hi == pytest.approx(3.0 + half, abs=TOL)


def test_estimate_of_one_value_has_no_spread():
  e = stats.estimate([0.99])
  assert e.mean == 0.99 and e.n == 1
  assert math.isnan(e.std) and math.isnan(e.lo) and math.isnan(e.hi)


def test_censored_counts_never_and_takes_the_median():
  e = stats.censored([10.0, None, 20.0])
  assert (e.n, e.reached, e.median) == (3, 2, 20.0)
  assert math.isnan(e.mean) and math.isnan(e.lo)
  assert stats.censored([None, None, 5.0]).median == math.inf
  full = stats.censored([10.0, 20.0])
  assert (full.mean, full.reached) == (15.0, 2)


def test_welch_by_hand():
  a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 5.0, 6.0]
  # var a = 5/3, var b = 10/3; se^2 = 5/12 + 10/12 = 1.25.
  se = math.sqrt(1.25)
  t = -1.5 / se
  df = 1.25 ** 2 / ((5 / 12) ** 2 / 3 + (10 / 12) ** 2 / 3)
  assert df == pytest.approx(5.4, rel=1e-12)
  p = 2 * t_cdf(t, df)
  half = t_ppf(0.975, df) * se
  c = stats.compare(a, b)
  assert c.test == "welch"
  assert c.diff == -1.5
  assert c.p == pytest.approx(p, abs=TOL)
  assert c.lo == pytest.approx(-1.5 - half, abs=TOL)
  assert c.hi == pytest.approx(-1.5 + half, abs=TOL)


def test_holm_by_hand():
  # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, max(0.06, 0.04*1)=0.06.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, 0.02], abs=1e-15)
  assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # Capped at 1, monotone.
  out = stats.holm([0.02, math.nan, 0.01])  # NaN: not in the family (m=2).
  assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)
  assert math.isnan(out[1])


def test_holm_matches_statsmodels():
  multitest = pytest.importorskip("statsmodels.stats.multitest")
  rng = np.random.default_rng(0)
  for m in (1, 2, 5, 12):
    p = rng.uniform(0, 0.2, m)
    expected = multitest.multipletests(p, alpha=0.05, method="holm")[1]
    np.testing.assert_allclose(stats.holm(p), expected, rtol=0, atol=1e-15)


def test_bootstrap_agrees_with_the_t_interval_on_normal_samples():
  rng = np.random.default_rng(1)
  n = 400
  a = rng.normal(0.3, 1.5, n)
  b = rng.normal(0.0, 1.0, n)
  c = stats.compare(a, b)
  se = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
  # Monte Carlo error of a 2.5% percentile endpoint with 9,999 resamples:
  # sqrt(0.025 * 0.975 / 9999) / phi(1.96) = 0.027 se; the plug-in variance
  # and z instead of t add about 0.006 se. 0.15 se is over 5 Monte Carlo
  # standard errors.
  assert c.boot_lo == pytest.approx(c.lo, abs=0.15 * se)
  assert c.boot_hi == pytest.approx(c.hi, abs=0.15 * se)
  # And both are real intervals around the difference, not degenerate.
  assert c.lo < c.diff < c.hi and c.boot_lo < c.diff < c.boot_hi


def test_compare_all_verdicts_and_holm():
  rng = np.random.default_rng(2)
  base = list(0.990 + 0.001 * rng.standard_normal(5))
  samples = {
      "base": base,
      "higher": list(0.995 + 0.001 * rng.standard_normal(5)),
      "lower": list(0.980 + 0.001 * rng.standard_normal(5)),
      "same": list(base[::-1]),  # The same values: t = 0, p = 1.
  }
  acc = stats.METRICS_BY_KEY["test_accuracy"]
  out = stats.compare_all(samples, "base", acc)
  assert list(out) == ["higher", "lower", "same"]
  assert out["higher"].verdict == stats.BETTER
  assert out["lower"].verdict == stats.WORSE
  assert out["same"].verdict == stats.SAME
  assert out["same"].p == pytest.approx(1.0)
  assert [c.p_holm for c in out.values()] == pytest.approx(
      stats.holm([c.p for c in out.values()]))
  # Lower loss is better: the same numbers as a loss flip the verdicts.
  loss = stats.compare_all(samples, "base", stats.METRICS_BY_KEY["test_loss"])
  assert loss["higher"].verdict == stats.WORSE
  with pytest.raises(ValueError, match="baseline 'nope'"):
    stats.compare_all(samples, "nope", acc)


def test_censored_comparison_ranks_never_last():
  tta = stats.METRICS_BY_KEY["time_to_target_s"]
  fast = [10.0, 11.0, 12.0, 13.0, 14.0, 10.5, 11.5, 12.5]
  never = [None] * 8
  out = stats.compare_all({"base": never, "fast": fast}, "base", tta)
  # Every reached time ranks before every never: U = 64 of 64, exact
  # two-sided p = 2 / C(16, 8) = 1/6435.
  assert out["fast"].test == "mann-whitney"
  assert out["fast"].p == pytest.approx(2 / math.comb(16, 8), rel=1e-9)
  assert out["fast"].verdict == stats.BETTER
  untestable = stats.compare([None, None], [None, None])
  assert math.isnan(untestable.p) and untestable.test == ""


def test_too_few_seeds_is_not_testable():
  c = stats.compare([0.99], [0.98, 0.985])
  assert math.isnan(c.p) and c.diff == pytest.approx(0.0075)
  assert stats.verdict(math.nan, 1.0, stats.METRICS[0]) == "not testable"
