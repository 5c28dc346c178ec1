"""Each setting's metrics over seeds, and each setting against the baseline.

The study file names its baseline in `get_report()["baseline"]` (stored in
sweep.json): a dict of dotted overrides that exactly one setting matches
(e.g. {"model.norm": "batch"}), or a variant name. For every metric of
stats.METRICS, `analyse` gives each group's estimate (mean, std, 95% t
interval; time to target as censored) and, when a baseline is found, each
other group's comparison (Welch's t-test, Welch and bootstrap intervals of
the difference, Holm over the study's groups, a verdict). The tables,
summary_by_variant.csv and the forest plot all read this one analysis.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any, Mapping, Sequence

from jaxreg import results
from jaxreg.report import stats
from jaxreg.report.grouping import SEED_AXIS, Group, fmt_value
from jaxreg.report.loading import Run, Study

SUMMARY_BY_VARIANT = "summary_by_variant.csv"


def run_value(run: Run, metric: stats.Metric) -> float | None:
  """A completed run's final value; for a time to target None = never."""
  if metric.key == "time_to_target_s":
    return run.time_to_target()[0]
  if metric.key == "epochs_to_target":
    return run.time_to_target()[1]
  return run.metric(metric.key)


def samples(group: Group, metric: stats.Metric) -> list[float | None] | None:
  """The group's values over completed seeds; None when the metric does not
  apply (no value at all, or no target for a time to target)."""
  runs = group.completed
  if metric.censored:
    if not runs or all(r.target is None for r in runs):
      return None
    return [run_value(r, metric) for r in runs]
  vals = [v for v in (run_value(r, metric) for r in runs) if v is not None]
  return vals or None


def _matches(group: Group, spec: Any) -> bool:
  if isinstance(spec, Mapping):
    return all(k in group.settings and group.settings[k] == v
               for k, v in spec.items())
  names = {group.label} | {r.name.rsplit("/seed=", 1)[0] for r in group.runs}
  return str(spec) in names


def find_baselines(study: Study, groups: Sequence[Group]
                   ) -> tuple[dict[str, Group], str]:
  """Each group's baseline (label -> Group; a baseline is not its own), and
  a note when the study's declaration cannot be resolved.

  `baseline` names one setting; with `baseline_within` (axes, e.g.
  ["train.batch_size"]) it names one per value of those axes, and each
  setting is compared with the baseline that shares them.
  """
  spec, within = study.baseline, list(study.baseline_within or ())
  if spec is None:
    return {}, ""
  key = lambda g: tuple(json.dumps(g.settings.get(x), default=str)
                        for x in within)
  hits: dict[tuple, list[Group]] = {}
  for g in groups:
    if _matches(g, spec):
      hits.setdefault(key(g), []).append(g)
  many = {k: v for k, v in hits.items() if len(v) > 1}
  if not hits or many:
    what = ("no setting" if not hits else
            f"{len(next(iter(many.values())))} settings")
    return {}, (f"baseline {spec!r} matches {what}"
                + (f" per value of {within}" if within else "")
                + "; the study file's get_report()['baseline'] must name "
                "exactly one (add the axes it varies along to "
                "'baseline_within'); settings: "
                + "; ".join(g.label for g in groups))
  out, alone = {}, []
  for g in groups:
    base = hits.get(key(g), [None])[0]
    if base is None:
      alone.append(g.label)
    elif base is not g:
      out[g.label] = base
  note = (f"no baseline shares {within} with: {'; '.join(alone)} (not "
          "compared)") if alone else ""
  return out, note


@dataclasses.dataclass
class Analysis:
  """Per metric: each group's estimate and, against the baseline, its
  comparison (absent for the baseline itself)."""
  groups: list[Group]
  baseline_of: dict[str, Group]  # Group label -> its baseline.
  asked: int  # Seeds asked per setting.
  estimates: dict[str, dict[str, stats.Estimate]]  # metric -> label -> est
  comparisons: dict[str, dict[str, stats.Comparison]]
  notes: list[str]

  @property
  def metrics(self) -> list[stats.Metric]:
    return [stats.METRICS_BY_KEY[k] for k in self.estimates]

  @property
  def baselines(self) -> list[Group]:
    """The baseline groups, in study order."""
    ids = {id(b) for b in self.baseline_of.values()}
    return [g for g in self.groups if id(g) in ids]

  @property
  def baseline(self) -> Group | None:
    """The first baseline (None without one)."""
    return (self.baselines or [None])[0]

  def incomplete(self, g: Group) -> bool:
    return len(g.completed) < max(self.asked, len(g.runs))


def analyse(study: Study, groups: Sequence[Group]) -> Analysis:
  """Estimates and comparisons of every metric that some group has."""
  baseline_of, note = find_baselines(study, groups)
  notes = [note] if note else []
  estimates: dict[str, dict[str, stats.Estimate]] = {}
  comparisons: dict[str, dict[str, stats.Comparison]] = {}
  for metric in stats.METRICS:
    per = {g.label: samples(g, metric) for g in groups}
    per = {k: v for k, v in per.items() if v is not None}
    if not per:
      continue
    est = stats.censored if metric.censored else stats.estimate
    estimates[metric.key] = {k: est(v) for k, v in per.items()}
    pairs = {k: (v, per[baseline_of[k].label]) for k, v in per.items()
             if k in baseline_of and baseline_of[k].label in per}
    if pairs:
      comparisons[metric.key] = stats.compare_pairs(pairs, metric)
  return Analysis(list(groups), baseline_of, study.num_seeds, estimates,
                  comparisons, notes)


def baseline_words(a: Analysis) -> str:
  """"norm=batch", or "its own of: A; B" for one baseline per stratum."""
  names = [g.label for g in a.baselines]
  return names[0] if len(names) == 1 else "its own of: " + "; ".join(names)


def fmt_estimate(e: stats.Estimate, metric: stats.Metric,
                 digits: int) -> str:
  """"99.20 ± 0.05 [99.14, 99.26]", the censored "median 12.0 (3/5
  reached)", or the value alone for one seed."""
  s = metric.scale
  if math.isnan(e.mean):
    if e.n == 0:
      return "-"
    if math.isinf(e.median):
      return f"never ({e.reached}/{e.n} reached)"
    return f"median {e.median * s:.{digits}f} ({e.reached}/{e.n} reached)"
  if e.n < 2:
    return f"{e.mean * s:.{digits}f}"
  return (f"{e.mean * s:.{digits}f} ± {e.std * s:.{digits}f} "
          f"[{e.lo * s:.{digits}f}, {e.hi * s:.{digits}f}]")


def fmt_diff(c: stats.Comparison, metric: stats.Metric, digits: int
             ) -> tuple[str, str]:
  """("+0.12 [-0.05, +0.29]", bootstrap "[-0.02, +0.25]") of a comparison."""
  s = metric.scale
  if math.isnan(c.diff):
    return "-", "-"
  welch = f"{c.diff * s:+.{digits}f}"
  if not math.isnan(c.lo):
    welch += f" [{c.lo * s:+.{digits}f}, {c.hi * s:+.{digits}f}]"
  boot = ("-" if math.isnan(c.boot_lo) else
          f"[{c.boot_lo * s:+.{digits}f}, {c.boot_hi * s:+.{digits}f}]")
  return welch, boot


def _p(v: float) -> str:
  return "-" if math.isnan(v) else (f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}")


DIGITS = {"test_accuracy": 2, "val_accuracy": 2, "test_macro_f1": 2,
          "test_loss": 4, "time_to_target_s": 1, "epochs_to_target": 1}


def comparison_rows(a: Analysis) -> list[dict[str, Any]]:
  """The statistics table: one row per setting, test accuracy in full
  (mean ± std [CI], difference to the baseline with its Welch and bootstrap
  intervals, p, Holm p, verdict) and the verdicts of the other metrics."""
  key = "test_accuracy"
  metric = stats.METRICS_BY_KEY[key]
  rows = []
  for g in a.groups:
    est = a.estimates.get(key, {}).get(g.label)
    c = a.comparisons.get(key, {}).get(g.label)
    seeds = f"{len(g.completed)}/{max(a.asked, len(g.runs))}"
    row: dict[str, Any] = {
        "setting": g.label + (" (baseline)" if g in a.baselines else ""),
        "seeds": seeds + (" (incomplete)" if a.incomplete(g) else ""),
        "test acc (%) mean ± std [95% CI]": (
            fmt_estimate(est, metric, 2) if est else "-")}
    if a.baseline is not None:
      # The baseline's own row says so; a setting without a comparison
      # (no seeds yet, no baseline in its stratum) shows "-".
      none = "baseline" if g in a.baselines else "-"
      welch, boot = fmt_diff(c, metric, 2) if c else ("-", "-")
      row.update({"Δ acc (pp) [Welch 95% CI]": welch,
                  "Δ [bootstrap 95% CI]": boot,
                  "p (Welch)": _p(c.p) if c else "-",
                  "p (Holm)": _p(c.p_holm) if c else "-",
                  "test accuracy": c.verdict if c else none})
      for k in ("test_loss", "test_macro_f1", "epochs_to_target"):
        cc = a.comparisons.get(k, {}).get(g.label)
        if k in a.comparisons:
          row[stats.METRICS_BY_KEY[k].label.split(" (")[0]] = (
              cc.verdict if cc else none)
    rows.append(row)
  return rows


def estimate_rows(a: Analysis) -> list[dict[str, Any]]:
  """Mean ± std [95% CI] of every metric, one row per setting."""
  rows = []
  for g in a.groups:
    row: dict[str, Any] = {"setting": g.label}
    for m in a.metrics:
      e = a.estimates[m.key].get(g.label)
      row[m.label] = fmt_estimate(e, m, DIGITS.get(m.key, 3)) if e else "-"
    rows.append(row)
  return rows


def _num(v: float) -> Any:
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def csv_rows(study: Study, a: Analysis) -> list[dict[str, Any]]:
  """summary_by_variant.csv: per setting, its axis values, seeds completed
  and asked, and per metric n, mean, std, ci_lo, ci_hi (censored: reached,
  median) and against the baseline diff, Welch and bootstrap intervals,
  p, Holm p, verdict. Values in the metric's own units (accuracy 0..1)."""
  other = [x for x in study.axes if x != SEED_AXIS]
  rows = []
  for g in a.groups:
    row: dict[str, Any] = {"variant": g.label}
    row.update({x: "" if g.settings.get(x) is None
                else fmt_value(g.settings.get(x)) for x in other})
    row.update({"seeds_completed": len(g.completed),
                "seeds_asked": max(a.asked, len(g.runs)),
                "baseline": g in a.baselines,
                "baseline_of": (a.baseline_of[g.label].label
                                if g.label in a.baseline_of else "")})
    for m in a.metrics:
      e = a.estimates[m.key].get(g.label)
      k = m.key
      if e is not None:
        row.update({f"{k}_n": e.n, f"{k}_mean": _num(e.mean),
                    f"{k}_std": _num(e.std), f"{k}_ci_lo": _num(e.lo),
                    f"{k}_ci_hi": _num(e.hi)})
        if m.censored:
          row.update({f"{k}_reached": e.reached,
                      f"{k}_median": ("never" if math.isinf(e.median)
                                      else _num(e.median))})
      c = a.comparisons.get(k, {}).get(g.label)
      if c is not None:
        row.update({f"{k}_diff": _num(c.diff), f"{k}_diff_lo": _num(c.lo),
                    f"{k}_diff_hi": _num(c.hi),
                    f"{k}_boot_lo": _num(c.boot_lo),
                    f"{k}_boot_hi": _num(c.boot_hi), f"{k}_test": c.test,
                    f"{k}_p": _num(c.p), f"{k}_p_holm": _num(c.p_holm),
                    f"{k}_verdict": c.verdict})
    rows.append(row)
  return rows


def write_by_variant(study: Study, a: Analysis) -> Any:
  """Writes `<workdir>/summary_by_variant.csv`; returns its path."""
  rows = csv_rows(study, a)
  columns: list[str] = []
  for r in rows:
    columns.extend(k for k in r if k not in columns)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  path = study.workdir / SUMMARY_BY_VARIANT
  results.write_atomic(path, buf.getvalue())
  return path
