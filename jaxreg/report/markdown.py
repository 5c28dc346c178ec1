"""The report document: header, tables, best variant, figures and notes,
assembled into `<workdir>/report.md`."""
from __future__ import annotations

import collections
import datetime
import os
from pathlib import Path
from typing import Callable

from jaxreg import results
from jaxreg.report import comparison
from jaxreg.report import figures
from jaxreg.report import tables
from jaxreg.report.grouping import SEED_AXIS, Group, best_group, group_runs
from jaxreg.report.loading import Study, load_study


def _environment_line(study: Study) -> str:
  env = next((r.env for r in study.runs if r.env), {})
  if not env:
    return ""
  dev = env.get("device_kind") or (env.get("devices") or ["?"])[0]
  parts = [f"backend {env.get('backend', '?')}",
           f"{env.get('device_count', '?')} x {dev}",
           f"jax {env.get('jax', '?')}", f"flax {env.get('flax', '?')}",
           f"optax {env.get('optax', '?')}"]
  if env.get("git_revision"):
    parts.append(f"git {str(env['git_revision'])[:12]}")
  return "Environment (first run): " + ", ".join(parts) + "."


def _header(study: Study) -> list[str]:
  md = [f"# {study.name}", ""]
  counts = collections.Counter(r.status for r in study.runs)
  kind = "Sweep" if study.is_sweep else "Single run"
  md.append(f"{kind} in `{study.workdir}`: {len(study.runs)} run"
            f"{'s' if len(study.runs) != 1 else ''} ("
            + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ").")
  datasets = sorted({r.dataset for r in study.runs if r.dataset})
  if datasets:
    md.append(f"Dataset: {', '.join(datasets)}.")
  if study.axes:
    md.append("Axes: " + ", ".join(f"`{a}`" for a in study.axes) + ".")
  targets = sorted({r.target for r in study.runs if r.target is not None})
  if targets:
    md.append("Target test accuracy: " +
              ", ".join(f"{100 * t:g}%" for t in targets) +
              " (time to target is cumulative training time, compilation "
              "excluded; \"never\" = not reached).")
  env = _environment_line(study)
  if env:
    md.append(env)
  now = datetime.datetime.now().isoformat(timespec="seconds")
  md.append(f"Generated {now}.")
  return md


def _results(study: Study, groups: list[Group]) -> list[str]:
  md = ["", "## Results", ""]
  if SEED_AXIS in study.axes:
    md.append("One row per setting; values are mean ± sample std over its "
              "completed seeds (\"seeds\" = completed/total). Accuracy and F1 "
              "in %, times in seconds.")
  else:
    md.append("Accuracy and F1 in %, times in seconds.")
  return md + ["", tables.render_table(tables.summary_rows(study, groups)), ""]


def _statistics(a: comparison.Analysis) -> list[str]:
  """The seeds section: estimates, and tests against the baseline."""
  md = ["## Statistics over seeds", ""]
  short = [g.label for g in a.groups if a.incomplete(g)]
  if short:
    md += [f"**Incomplete:** {', '.join(short)} ha{'s' if len(short) == 1 else 've'}"
           f" fewer completed seeds than the {a.asked} asked; their "
           "estimates and tests use the seeds that finished.", ""]
  md.append("Mean ± sample std (ddof=1) [95% t confidence interval of the "
            "mean] over completed seeds. Time and epochs to target are "
            "censored (\"never\" is later than any reached value): with a "
            "\"never\" only the median and the count reached are given.")
  if a.baseline is None:
    md += ["", "The study file names no baseline (get_report()['baseline'])"
           ", so no setting is tested against another."]
  else:
    md += ["", f"Each setting against the baseline "
           f"**{comparison.baseline_words(a)}**: "
           "Δ = setting - baseline (accuracy in percentage points) with the "
           "Welch t interval and a percentile bootstrap interval (9,999 "
           "resamples, each sample resampled on its own); two-sided Welch "
           "t-test, p-values Holm-corrected over the study's settings, "
           "verdict at 5% (better / worse / not distinguishable; \"not "
           "testable\" with fewer than 2 seeds on a side). Time and epochs "
           "to target with a \"never\" are compared by an exact Mann-Whitney "
           "U test with never ranked last. With few seeds the bootstrap "
           "interval is too narrow (it cannot see beyond the values drawn); "
           "the verdict follows the t-test.", "",
           tables.render_table(comparison.comparison_rows(a))]
  md += ["", tables.render_table(comparison.estimate_rows(a)), "",
         f"Every number above is in `{comparison.SUMMARY_BY_VARIANT}`.", ""]
  return md


def _best(study: Study, groups: list[Group], best: Group | None,
          best_key: str, link: Callable[[Path], str]) -> list[str]:
  md = ["## Best variant", ""]
  if best is None:
    return md + ["No run completed, so there is no best variant.", ""]
  accs = best.values("test_accuracy")
  basis = ("validation accuracy" if best_key == "val_accuracy"
           else "test accuracy")
  if any(len(g.completed) > 1 for g in groups):
    basis = "mean " + basis
  line = (f"**{best.label}** (highest {basis}): test accuracy "
          f"{tables.pm(accs, 100)}%")
  if best_key == "val_accuracy":
    line += (", validation accuracy "
             f"{tables.pm(best.values('val_accuracy'), 100)}%")
  line += f", train time {tables.pm(best.values('train_time_s'), digits=1)} s"
  tta = tables.tta_cell(best.completed, 0, 1, unit=" s")
  if tta != "-":
    line += f", time to {tables.target_label(study.runs)}: {tta}"
  if len(best.runs) > 1:
    line += f" ({len(best.completed)} seeds)"
  md.append(line + ".")
  if study.is_sweep:
    md.append("Run director" + ("ies" if len(best.completed) > 1 else "y") +
              ": " + ", ".join(f"`{link(r.path)}`" for r in best.completed)
              + ".")
  return md + [""]


def _figures(ctx: figures.Context, link: Callable[[Path], str],
             notes: list[str]) -> list[str]:
  """Every registered figure that applies; one that raises becomes a note."""
  md = []
  for spec in figures.REGISTRY:
    for item in spec.items(ctx):
      try:
        if not spec.applies(ctx, item):
          continue
        drawn = spec.draw(ctx, item)
        if drawn is None:
          continue
        caption = spec.caption(ctx, drawn)
      except Exception as e:  # A broken figure must not cost the whole report.
        what = spec.name if item is None else (
            f"{spec.name} ({' x '.join(map(str, item))})")
        notes.append(f"figure {what} failed: {type(e).__name__}: {e}")
        continue
      md += [f"### {drawn.heading}", "", caption, "",
             f"![{drawn.heading}]({link(drawn.path)})", ""]
  return (["## Figures", ""] + md) if md else []


def build_report(workdir: str | os.PathLike,
                 out: str | os.PathLike | None = None) -> Path:
  """Writes the markdown report and its figures; returns the report's path.

  Args:
    workdir: a sweep directory (sweep.json, summary.csv, one directory per
      variant) or a single run directory (summary.json at the top).
    out: where to write the markdown (default `<workdir>/report.md`).
      Figures always go to `<workdir>/figures/`; links are relative to `out`.

  Raises:
    ValueError: when `workdir` is neither a sweep nor a run directory.
  """
  study = load_study(workdir)
  out = Path(out) if out is not None else study.workdir / "report.md"
  groups = group_runs(study)
  best, best_key = best_group(groups)
  notes = list(study.notes)

  def link(p: Path) -> str:
    return Path(os.path.relpath(p.resolve(), out.parent.resolve())).as_posix()

  md = _header(study) + _results(study, groups)
  analysis = None
  if SEED_AXIS in study.axes:
    analysis = comparison.analyse(study, groups)
    notes.extend(analysis.notes)
    comparison.write_by_variant(study, analysis)
    md += _statistics(analysis)
  md += _best(study, groups, best, best_key, link)
  if SEED_AXIS in study.axes:
    md += ["## Runs", "", "Every run behind the table above.", "",
           tables.render_table(tables.run_rows(study)), ""]
  ctx = figures.Context(study, groups, best, study.workdir / "figures",
                        analysis)
  md += _figures(ctx, link, notes)
  for run in study.runs:
    notes.extend(f"`{run.name}`: {n}" for n in run.notes)
  notes = list(dict.fromkeys(notes))  # a file may be read by two figures
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  out.parent.mkdir(parents=True, exist_ok=True)
  results.write_atomic(out, "\n".join(md))
  return out
