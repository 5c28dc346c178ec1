"""The report's tables: one row per setting (mean ± std over seeds), per run.

Rows are plain dicts (column header -> value) so that a new column is one
more key; `render_table` turns any list of them into markdown.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from jaxreg import metrics
from jaxreg.report.grouping import (SEED_AXIS, Group, describe, fmt_value,
                                    short_names)
from jaxreg.report.loading import Run, Study


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return "-" if math.isnan(v) else f"{v:.4g}"
  text = str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
  return text


_NUMERIC = re.compile(r"^[-+]?(\d|\.\d)[\d.,e+\-]*( ± [\d.e+\-]+)?( \(.*\))?$")


def render_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str] | None = None) -> str:
  """A GitHub-flavoured markdown table.

  Args:
    rows: one mapping per row; its keys are column headers.
    columns: header order; default: keys in order of first appearance.

  Returns:
    The table as text (no trailing newline; "" for no rows). None and NaN
    show as "-", other floats with 4 significant digits, pipes and newlines
    in cells are escaped. Columns whose cells all look numeric are right
    aligned.
  """
  if not rows:
    return ""
  if columns is None:
    columns = []
    for r in rows:
      columns.extend(k for k in r if k not in columns)
  cells = [[_cell(r.get(c)) for c in columns] for r in rows]
  aligns = []
  for j in range(len(columns)):
    col = [row[j] for row in cells if row[j] != "-"]
    numeric = bool(col) and all(_NUMERIC.match(x) for x in col)
    aligns.append("---:" if numeric else "---")
  lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
           "| " + " | ".join(aligns) + " |"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  return "\n".join(lines)


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
  """"mean ± std" of `values` * `scale` (sample std), the mean alone for one
  value, "-" for none."""
  if not values:
    return "-"
  mean, std = metrics.mean_std([v * scale for v in values])
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def tta_cell(runs: Sequence[Run], index: int, digits: int,
             unit: str = "") -> str:
  """Mean ± std time (index 0) or epochs (1) to target over `runs`."""
  if not runs or all(r.target is None for r in runs):
    return "-"
  reached = [t[index] for t in (r.time_to_target() for r in runs)
             if t[index] is not None]
  if not reached:
    return "never" if all(r.completed for r in runs) else "not yet"
  if index == 1 and all(float(e).is_integer() for e in reached):
    digits = 0 if len(reached) == 1 else digits
  text = pm(reached, digits=digits) + unit
  if len(reached) < len(runs):
    text += f" ({len(reached)}/{len(runs)} reached)"
  return text


def _short_error(err: Any, limit: int = 160) -> str:
  if not err:
    return ""
  text = " ".join(str(err).split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


def target_label(runs: Sequence[Run]) -> str:
  """"87%" when every run with a target shares it, else "target"."""
  targets = {r.target for r in runs if r.target is not None}
  if len(targets) == 1:
    return f"{100 * targets.pop():g}%"
  return "target"


def _metric_columns(study: Study, runs: Sequence[Run],
                    has_val: bool) -> dict[str, str]:
  """Mean ± std over `runs` of each reported metric, formatted."""
  vals = lambda k: [v for v in (r.metric(k) for r in runs) if v is not None]
  tl = target_label(study.runs)
  cols = {"test acc (%)": pm(vals("test_accuracy"), 100)}
  if has_val:
    cols["val acc (%)"] = pm(vals("val_accuracy"), 100)
  cols.update({
      "test macro F1 (%)": pm(vals("test_macro_f1"), 100),
      "test loss": pm(vals("test_loss"), digits=4),
      "train time (s)": pm(vals("train_time_s"), digits=1),
      "compile (s)": pm(vals("compile_time_s"), digits=1),
      f"time to {tl} (s)": tta_cell(runs, 0, 1),
      f"epochs to {tl}": tta_cell(runs, 1, 1),
      "epochs": (f"{vals('epochs_completed')[0]:.0f}"
                 if len(set(vals("epochs_completed"))) == 1
                 else pm(vals("epochs_completed"), digits=1)),
  })
  return cols


def summary_rows(study: Study, groups: Sequence[Group]) -> list[dict[str, Any]]:
  """Rows of the main table: one per group (mean ± std over seeds)."""
  seeded = SEED_AXIS in study.axes
  other = [a for a in study.axes if a != SEED_AXIS]
  short = short_names(other)
  has_val = any(r.metric("val_accuracy") is not None for r in study.runs)

  def redundant(g: Group) -> bool:  # the label only repeats the axis columns
    settings = {a: g.settings.get(a) for a in other}
    return bool(other) and g.label in (
        ", ".join(fmt_value(v) for v in settings.values()),
        describe(settings, short))

  show_label = not seeded or not all(redundant(g) for g in groups)
  rows = []
  for g in groups:
    row: dict[str, Any] = {}
    if seeded:
      if show_label:
        row["setting"] = g.label
      for a in other:
        row[short[a]] = fmt_value(g.settings.get(a))
      row["seeds"] = f"{len(g.completed)}/{len(g.runs)}"
    else:
      row["variant"] = g.label
      for a in other:
        row[short[a]] = fmt_value(g.settings.get(a))
    row["status"] = g.status
    # A lone run still in progress shows its latest epoch; seeded means use
    # finished runs only.
    runs = g.completed if seeded else [r for r in g.runs
                                       if r.completed or r.status == "running"]
    row.update(_metric_columns(study, runs, has_val))
    params = g.values("num_params")
    row["params"] = f"{int(params[0]):,}" if params else "-"
    if not seeded:
      row["error"] = _short_error(g.runs[0].error) or None
    rows.append(row)
  if not seeded and not any(r.get("error") for r in rows):
    for r in rows:
      r.pop("error")
  return rows


def run_rows(study: Study) -> list[dict[str, Any]]:
  """One row per run: the seeds behind a grouped table, with errors."""
  tl = target_label(study.runs)
  rows = []
  for r in study.runs:
    acc = r.metric("test_accuracy")
    tta = r.time_to_target()
    if r.target is None or not (r.completed or r.status == "running"):
      tta_text = "-"
    elif tta[0] is not None:
      tta_text = f"{tta[0]:.1f}"
    else:
      tta_text = "never" if r.completed else "not yet"
    rows.append({
        "variant": r.name,
        "seed": fmt_value(r.overrides.get(SEED_AXIS, r.summary.get("seed"))),
        "status": r.status,
        "test acc (%)": f"{100 * acc:.2f}" if acc is not None else "-",
        "train time (s)": (f"{r.metric('train_time_s'):.1f}"
                           if r.metric("train_time_s") is not None else "-"),
        f"time to {tl} (s)": tta_text,
        "epochs": (f"{r.metric('epochs_completed'):.0f}"
                   if r.metric("epochs_completed") is not None else "-"),
        "error": _short_error(r.error) or None,
    })
  return rows
