"""Markdown report with tables and figures for a sweep or a single run.

    python -m jaxreg.report <workdir> [--out report.md]

reads the files a run or sweep leaves behind (layout in results.py and
sweep.py) and writes `<workdir>/report.md` with PNG figures under
`<workdir>/figures/`. It only reads files, so it works on a sweep that is
still running or partly failed: a variant that failed, diverged or lacks
files is listed with its status and error and left out of means, plots and
the choice of the best variant; it never stops the report.

Variants that differ only in the `seed` axis are repeats of one setting: the
report groups them and shows mean ± sample std (ddof=1) over the completed
seeds. Each group keeps one colour in every figure.
"""
from __future__ import annotations

import argparse
import ast
import collections
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxreg import metrics
from jaxreg import results

SEED_AXIS = "seed"
NORM_AXIS = "model.norm_layers"
DROPOUT_AXIS = "model.dropout_layers"
# Columns of summary.csv that are not axes (formats: variant, status, axes...,
# then these).
CSV_METRIC_COLUMNS = (
    "test_accuracy", "test_loss", "test_macro_f1", "val_accuracy",
    "train_time_s", "compile_time_s", "time_to_target_s", "epochs_to_target",
    "epochs_completed", "num_params", "error")
DPI = 120
# Up to this many groups each gets its own tab10 colour; beyond, only the
# best this many do and the rest are drawn in grey, so legends stay readable.
NUM_COLORS = 10
# Heatmaps get one row per combination of the other axes up to this many;
# beyond it they show the best over the other axes.
MAX_HEATMAP_ROWS = 6
MAX_MISCLASSIFIED_ROWS = 12
# One confusion matrix per group up to this many groups, else the best only.
MAX_CONFUSION_PANELS = 4

# Fallback class names for when no misclassified.npz carries them.
KNOWN_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                "horse", "ship", "truck"),
    "svhn_cropped": tuple(str(i) for i in range(10)),
}


# --- Reading ----------------------------------------------------------------


def _num(v: Any) -> float | None:
  """A JSON/CSV value as float: None for absent, "nan"/"inf" strings parsed."""
  if v is None or isinstance(v, bool):
    return None
  if isinstance(v, (int, float, np.number)):
    return float(v)
  if isinstance(v, str):
    try:
      return float(v.strip())
    except ValueError:
      return None
  return None


def _finite(v: Any) -> float | None:
  x = _num(v)
  return x if x is not None and math.isfinite(x) else None


@dataclasses.dataclass
class Run:
  """What one run directory holds, as far as it could be read."""
  name: str
  path: Path
  overrides: dict[str, Any]
  status: str = "missing"
  error: str | None = None
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  env: dict[str, Any] = dataclasses.field(default_factory=dict)
  misclassified: Path | None = None
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def completed(self) -> bool:
    return self.status == "completed"

  def metric(self, key: str) -> float | None:
    """A finite summary value, else the last logged value (running runs)."""
    v = _finite(self.summary.get(key))
    if v is None and key not in self.summary:
      for rec in reversed(self.history):
        if key in rec:
          return _finite(rec[key])
    return v

  @property
  def target(self) -> float | None:
    t = _finite(self.summary.get("target_accuracy"))
    return t if t is not None else _finite(self.config.get("target_accuracy"))

  def time_to_target(self) -> tuple[float | None, float | None]:
    """(seconds, epochs) to the target, None where never reached."""
    if "time_to_target_s" in self.summary:
      return (_finite(self.summary.get("time_to_target_s")),
              _finite(self.summary.get("epochs_to_target")))
    if self.target is None or not self.history:
      return None, None
    s, e = metrics.time_to_target(self.history, self.target)
    return s, (float(e) if e is not None else None)

  @property
  def dataset(self) -> str | None:
    d = self.summary.get("dataset")
    if d is None and isinstance(self.config.get("dataset"), dict):
      d = self.config["dataset"].get("name")
    return d if isinstance(d, str) else None


def _read_json(path: Path, notes: list[str]) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    notes.append(f"{path.name} unreadable ({type(e).__name__}: {e})")
    return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
  rows = []
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    notes.append(f"{path.name} unreadable ({e})")
    return rows
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError:
      notes.append(f"{path.name} line {i} is not JSON; skipped")
      continue
    if isinstance(rec, dict):
      rows.append(rec)
  return rows


def load_run(path: str | os.PathLike, name: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> Run:
  """Reads one run directory; problems become notes and a status, not errors."""
  path = Path(path)
  run = Run(name=name or path.name, path=path, overrides=dict(overrides or {}))
  if not path.is_dir():
    run.notes.append("run directory missing")
    return run
  if (path / "summary.json").exists():
    summary = _read_json(path / "summary.json", run.notes)
    if isinstance(summary, dict):
      run.summary = summary
      run.status = str(summary.get("status", "unknown"))
      run.error = summary.get("error")
      if not run.overrides and isinstance(summary.get("overrides"), dict):
        run.overrides = dict(summary["overrides"])
    else:
      run.status = "unreadable"
  else:
    run.status = "incomplete"
    run.notes.append("summary.json missing")
  if (path / "metrics.jsonl").exists():
    run.history = _read_jsonl(path / "metrics.jsonl", run.notes)
  elif run.status in ("completed", "running"):
    run.notes.append("metrics.jsonl missing")
  for attr, fname in (("config", "config.json"), ("env", "env.json")):
    if (path / fname).exists():
      obj = _read_json(path / fname, run.notes)
      if isinstance(obj, dict):
        setattr(run, attr, obj)
  if (path / "misclassified.npz").exists():
    run.misclassified = path / "misclassified.npz"
  return run


def _parse_cell(text: str) -> Any:
  """A summary.csv cell back to a value: '0.2' -> 0.2, '[1, 2]' -> [1, 2]."""
  if text == "":
    return None
  try:
    return json.loads(text)
  except ValueError:
    pass
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


@dataclasses.dataclass
class Study:
  """Everything read from a workdir."""
  workdir: Path
  name: str
  axes: list[str]
  runs: list[Run]
  is_sweep: bool
  notes: list[str] = dataclasses.field(default_factory=list)


def load_study(workdir: str | os.PathLike) -> Study:
  """Reads a sweep directory (sweep.json / summary.csv) or a single run."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise ValueError(f"{workdir} is not a directory; pass a sweep or run "
                     "directory")
  notes: list[str] = []
  sweep_json, summary_csv = workdir / "sweep.json", workdir / "summary.csv"
  if sweep_json.exists() or summary_csv.exists():
    spec: dict = {}
    if sweep_json.exists():
      obj = _read_json(sweep_json, notes)
      spec = obj if isinstance(obj, dict) else {}
    csv_rows: dict[str, dict] = {}
    csv_axes: list[str] = []
    if summary_csv.exists():
      try:
        with open(summary_csv, newline="") as f:
          reader = csv.DictReader(f)
          csv_axes = [c for c in reader.fieldnames or ()
                      if c not in ("variant", "status", *CSV_METRIC_COLUMNS)]
          for row in reader:
            if row.get("variant"):
              csv_rows[row["variant"]] = row
      except (OSError, csv.Error) as e:
        notes.append(f"summary.csv unreadable ({e})")
    axes = list(spec.get("axes") or csv_axes)
    variants = [v for v in spec.get("variants") or () if isinstance(v, dict)
                and v.get("name")]
    listed = {v["name"] for v in variants}
    for name, row in csv_rows.items():
      if name not in listed:
        variants.append({"name": name, "overrides": {
            a: _parse_cell(row.get(a, "")) for a in axes}})
    if not variants:
      notes.append("sweep.json and summary.csv list no variants")
    runs = []
    for v in variants:
      run = load_run(workdir / v["name"], v["name"], v.get("overrides") or {})
      row = csv_rows.get(v["name"])
      if row is not None and not run.summary:
        # The table remembers what a deleted or unreadable run dir no longer
        # can, e.g. the error of a variant that failed before writing files.
        run.status = row.get("status") or run.status
        run.error = row.get("error") or run.error
        run.summary = {k: _parse_cell(row[k]) for k in CSV_METRIC_COLUMNS
                       if row.get(k, "") != ""}
        if "time_to_target_s" not in run.summary and run.completed:
          run.summary["time_to_target_s"] = None
      runs.append(run)
    name = spec.get("study")
    if not name:
      name = next((r.config.get("name") for r in runs if r.config.get("name")),
                  workdir.name)
    return Study(workdir, str(name), axes, runs, True, notes)
  if any((workdir / f).exists() for f in ("summary.json", "metrics.jsonl")):
    run = load_run(workdir)
    run.name = str(run.summary.get("variant") or run.config.get("name") or
                   workdir.name)
    name = run.config.get("name") or run.name
    return Study(workdir, str(name), [], [run], False, notes)
  raise ValueError(f"{workdir} holds neither sweep.json/summary.csv (a sweep) "
                   "nor summary.json/metrics.jsonl (a run); pass the directory "
                   "given to launch.py as --workdir")


# --- Grouping over seeds ----------------------------------------------------


def _fmt_value(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
  return str(v)


def _short_names(axes: Sequence[str]) -> dict[str, str]:
  """Last dotted component, unless two axes would then share a name."""
  last = [a.rsplit(".", 1)[-1] for a in axes]
  return {a: (s if last.count(s) == 1 else a) for a, s in zip(axes, last)}


_SEED_IN_NAME = re.compile(r"(?:^|[_,\-.\s/]+)seed[=_:\-]?\d+(?=$|[_,\-.\s/])",
                           re.IGNORECASE)


@dataclasses.dataclass
class Group:
  """Runs that differ only in their seed."""
  label: str
  settings: dict[str, Any]
  runs: list[Run]
  color: Any = None
  highlight: bool = True  # Own colour and legend entry (see NUM_COLORS).

  @property
  def completed(self) -> list[Run]:
    return [r for r in self.runs if r.completed]

  @property
  def plotted(self) -> list[Run]:
    """Completed runs, or for a group without any, whatever has a history."""
    return self.completed or [r for r in self.runs if r.history]

  def values(self, key: str) -> list[float]:
    return [v for v in (r.metric(key) for r in self.completed) if v is not None]

  def mean(self, key: str) -> float | None:
    v = self.values(key)
    return metrics.mean_std(v)[0] if v else None

  @property
  def status(self) -> str:
    counts = collections.Counter(r.status for r in self.runs)
    if len(counts) == 1:
      return next(iter(counts))
    return ", ".join(f"{n} {s}" for s, n in counts.most_common())


def group_runs(study: Study) -> list[Group]:
  """Groups runs over the seed axis, in sweep order, and assigns colours."""
  seeded = SEED_AXIS in study.axes
  other = [a for a in study.axes if a != SEED_AXIS]
  short = _short_names(other)
  groups: dict[str, Group] = {}
  for run in study.runs:
    settings = {a: run.overrides.get(a) for a in other}
    key = (json.dumps(settings, sort_keys=True, default=str) if seeded
           else run.name)
    if key not in groups:
      groups[key] = Group(label="", settings=settings, runs=[])
    groups[key].runs.append(run)
  out = list(groups.values())
  for g in out:
    if not seeded:
      g.label = g.runs[0].name
      continue
    # Prefer the variant name with its seed part removed when it is the same
    # for every seed: the study author chose it; else spell out the axes.
    stripped = {_SEED_IN_NAME.sub("", r.name).strip("_-,. ") for r in g.runs}
    if len(stripped) == 1 and next(iter(stripped)):
      g.label = next(iter(stripped))
    elif other:
      g.label = ", ".join(f"{short[a]}={_fmt_value(v)}"
                          for a, v in g.settings.items())
    else:
      g.label = study.name
  labels = [g.label for g in out]
  if len(set(labels)) != len(labels):  # e.g. names that differ only in seed
    for g in out:
      g.label = ", ".join(f"{short[a]}={_fmt_value(v)}"
                          for a, v in g.settings.items()) or g.label
  _assign_colors(out)
  return out


def _assign_colors(groups: Sequence[Group]) -> None:
  """One colour per group for every figure: tab10, or the best 10 + greys."""
  if len(groups) <= NUM_COLORS:
    best = list(groups)
  else:
    key = _ranking_key(groups)
    ranked = sorted(groups, key=lambda g: -(g.mean(key) if g.mean(key)
                                            is not None else -math.inf))
    best = ranked[:NUM_COLORS]
  chosen = {id(g) for g in best}
  # tab10 with its grey swapped for black: grey means "not highlighted".
  colors = [matplotlib.colormaps["tab10"](k) for k in range(10)]
  colors[7] = (0.0, 0.0, 0.0, 1.0)
  greys = matplotlib.colormaps["Greys"]
  i = j = 0
  for g in groups:  # sweep order, so related settings sit side by side
    g.highlight = id(g) in chosen
    if g.highlight:
      g.color, i = colors[i], i + 1
    else:
      g.color, j = greys(0.25 + 0.2 * (j % 3) / 2), j + 1


# --- Tables -----------------------------------------------------------------


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


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
  if not values:
    return "-"
  mean, std = metrics.mean_std([v * scale for v in values])
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _tta_cell(runs: Sequence[Run], index: int, digits: int,
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
  text = _pm(reached, digits=digits) + unit
  if len(reached) < len(runs):
    text += f" ({len(reached)}/{len(runs)} reached)"
  return text


def _short_error(err: Any, limit: int = 160) -> str:
  if not err:
    return ""
  text = " ".join(str(err).split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


def _target_label(study: Study) -> str:
  targets = {r.target for r in study.runs if r.target is not None}
  if len(targets) == 1:
    return f"{100 * targets.pop():g}%"
  return "target"


def _metric_columns(study: Study, runs: Sequence[Run],
                    has_val: bool) -> dict[str, str]:
  """Mean ± std over `runs` of each reported metric, formatted."""
  vals = lambda k: [v for v in (r.metric(k) for r in runs) if v is not None]
  tl = _target_label(study)
  cols = {"test acc (%)": _pm(vals("test_accuracy"), 100)}
  if has_val:
    cols["val acc (%)"] = _pm(vals("val_accuracy"), 100)
  cols.update({
      "test macro F1 (%)": _pm(vals("test_macro_f1"), 100),
      "test loss": _pm(vals("test_loss"), digits=4),
      "train time (s)": _pm(vals("train_time_s"), digits=1),
      "compile (s)": _pm(vals("compile_time_s"), digits=1),
      f"time to {tl} (s)": _tta_cell(runs, 0, 1),
      f"epochs to {tl}": _tta_cell(runs, 1, 1),
      "epochs": (f"{vals('epochs_completed')[0]:.0f}"
                 if len(set(vals("epochs_completed"))) == 1
                 else _pm(vals("epochs_completed"), digits=1)),
  })
  return cols


def summary_rows(study: Study, groups: Sequence[Group]) -> list[dict[str, Any]]:
  """Rows of the main table: one per group (mean ± std over seeds)."""
  seeded = SEED_AXIS in study.axes
  other = [a for a in study.axes if a != SEED_AXIS]
  short = _short_names(other)
  has_val = any(r.metric("val_accuracy") is not None for r in study.runs)

  def redundant(g: Group) -> bool:  # the label only repeats the axis columns
    vals = [_fmt_value(g.settings.get(a)) for a in other]
    named = [f"{short[a]}={v}" for a, v in zip(other, vals)]
    return bool(other) and g.label in (", ".join(vals), ", ".join(named))

  show_label = not seeded or not all(redundant(g) for g in groups)
  rows = []
  for g in groups:
    row: dict[str, Any] = {}
    if seeded:
      if show_label:
        row["setting"] = g.label
      for a in other:
        row[short[a]] = _fmt_value(g.settings.get(a))
      row["seeds"] = f"{len(g.completed)}/{len(g.runs)}"
    else:
      row["variant"] = g.label
      for a in other:
        row[short[a]] = _fmt_value(g.settings.get(a))
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
  tl = _target_label(study)
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
        "seed": _fmt_value(r.overrides.get(SEED_AXIS, r.summary.get("seed"))),
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


def _ranking_key(groups: Sequence[Group]) -> str:
  """Validation accuracy if every completed group has one, else test."""
  cands = [g for g in groups if g.values("test_accuracy")]
  if cands and all(g.values("val_accuracy") for g in cands):
    return "val_accuracy"
  return "test_accuracy"


def best_group(groups: Sequence[Group]) -> tuple[Group | None, str]:
  """The group with the highest mean of `_ranking_key`, and that key."""
  cands = [g for g in groups if g.values("test_accuracy")]
  if not cands:
    return None, ""
  key = _ranking_key(cands)
  return max(cands, key=lambda g: g.mean(key)), key


# --- Figures ----------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight",
              facecolor="white")
  results.write_atomic(path, buf.getvalue())
  return path


def _series(runs: Sequence[Run], key: str, scale: float = 1.0,
            get: Callable[[dict], Any] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Epochs and mean/min/max of a logged value over runs.

  The value is `rec[key]`, or `get(rec)` when given; epochs where no run
  logged it (e.g. between evaluations) are left out, so lines connect the
  evaluated epochs.
  """
  by_epoch: dict[int, list[float]] = collections.defaultdict(list)
  for r in runs:
    for i, rec in enumerate(r.history):
      v = _num(get(rec) if get else rec.get(key))
      if v is not None:
        by_epoch[int(rec.get("epoch", i + 1))].append(
            v * scale if math.isfinite(v) else math.nan)
  epochs = np.array(sorted(by_epoch), dtype=float)
  vals = [np.array(by_epoch[int(e)]) for e in epochs]
  mean = np.array([v.mean() for v in vals])
  lo = np.array([v.min() for v in vals])
  hi = np.array([v.max() for v in vals])
  return epochs, mean, lo, hi


def _legend_below(fig: Figure, handles: list, labels: list[str]) -> None:
  ncol = max(1, min(len(labels), 3 if max(map(len, labels)) > 30 else 4))
  fig.legend(handles, labels, loc="outside lower center", ncol=ncol,
             frameon=False, fontsize=9)


def plot_curves(groups: Sequence[Group], path: Path, title: str) -> Path | None:
  """Train/test loss and accuracy vs epoch, one colour per group."""
  groups = [g for g in groups if g.plotted]
  if not groups:
    return None
  has_val = any("val_accuracy" in rec for g in groups for r in g.plotted
                for rec in r.history)
  fig = Figure(figsize=(12, 8.5), layout="constrained")
  axs = fig.subplots(2, 2, sharex=True)
  panels = [(axs[0, 0], "train_loss", 1, "Train loss", "cross-entropy loss"),
            (axs[0, 1], "test_loss", 1, "Test loss", "cross-entropy loss"),
            (axs[1, 0], "train_accuracy", 100, "Train accuracy",
             "accuracy (%)"),
            (axs[1, 1], "test_accuracy", 100, "Test accuracy", "accuracy (%)")]
  seeded = any(len(g.plotted) > 1 for g in groups)
  for ax, key, scale, name, ylabel in panels:
    for g in groups:
      bright = g.highlight
      color = g.color
      ep, mean, lo, hi = _series(g.plotted, key, scale)
      if not len(ep):
        continue
      ax.plot(ep, mean, color=color, lw=1.8 if bright else 0.8,
              marker="o" if len(ep) <= 25 and bright else None, ms=3,
              zorder=3 if bright else 1)
      if len(g.plotted) > 1 and bright:
        ax.fill_between(ep, lo, hi, color=color, alpha=0.15, lw=0)
      if has_val and key.startswith("test_"):
        vep, vmean, _, _ = _series(g.plotted, "val_" + key[5:], scale)
        if len(vep):
          ax.plot(vep, vmean, color=color, lw=1.2 if bright else 0.6, ls="--",
                  zorder=2 if bright else 1)
    title_extra = (" (solid) and validation (dashed)"
                   if has_val and key.startswith("test_") else "")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    lines = [np.asarray(l.get_ydata(), float) for l in ax.get_lines()]
    ys = np.concatenate(lines) if lines else np.zeros(0)
    ys = ys[np.isfinite(ys)]
    if key.endswith("loss"):
      if ys.size and ys.min() > 0 and ys.max() / ys.min() > 20:
        ax.set_yscale("log")
        ylabel += " (log scale)"
        ax.set_ylabel(ylabel)
    elif ys.size:
      # Accuracy often climbs fast and then differs by tenths of a point
      # (MNIST): zoom on the second half of training when the first half
      # would flatten it.
      late = np.concatenate([l[len(l) // 2:] for l in lines if len(l) >= 4]
                            or [np.zeros(0)])
      late = late[np.isfinite(late)]
      if late.size:
        hi, lo = ys.max(), late.min()
        if hi - ys.min() > 4 * max(hi - lo, 1e-9):
          pad = max(hi - lo, 0.1)
          ax.set_ylim(lo - 0.15 * pad, min(hi + 0.1 * pad, 100.5))
          title_extra += ", zoomed on the 2nd half of training"
    ax.set_title(name + title_extra)
  for ax in axs[1]:
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
  handles, labels = [], []
  for g in groups:
    if g.highlight:
      handles.append(Line2D([], [], color=g.color, lw=1.8, marker="o", ms=3))
      labels.append(g.label + ("" if g.completed else f" ({g.status})"))
  others = sum(not g.highlight for g in groups)
  if others:
    handles.append(Line2D([], [], color=(0.6, 0.6, 0.6), lw=0.8))
    labels.append(f"{others} other variants (grey)")
  sub = "mean over seeds, band = min..max" if seeded else ""
  fig.suptitle(f"{title}: training curves" + (f" ({sub})" if sub else ""),
               fontsize=14)
  _legend_below(fig, handles, labels)
  return _save(fig, path)


def _sort_key(v: Any) -> tuple:
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return (0, float(v), "")
  return (1, 0.0, json.dumps(v, default=str))


def plot_heatmaps(groups: Sequence[Group], axes: Sequence[str], path: Path,
                  title: str) -> tuple[Path | None, str]:
  """Test accuracy, train time and time to target over norm x dropout layers.

  Returns the path and a sentence for the report saying what the rows are.
  """
  if NORM_AXIS not in axes or DROPOUT_AXIS not in axes:
    return None, ""
  others = [a for a in axes if a not in (NORM_AXIS, DROPOUT_AXIS, SEED_AXIS)]
  short = _short_names(list(axes))
  norms = sorted({json.dumps(g.settings.get(NORM_AXIS)) for g in groups},
                 key=lambda s: _sort_key(json.loads(s)))
  drops = sorted({json.dumps(g.settings.get(DROPOUT_AXIS)) for g in groups},
                 key=lambda s: _sort_key(json.loads(s)))
  combos: list[str] = []
  for g in groups:
    c = json.dumps([g.settings.get(a) for a in others], default=str)
    if c not in combos:
      combos.append(c)
  aggregate = len(combos) > MAX_HEATMAP_ROWS
  row_keys = [None] if aggregate else combos
  tl = "target"
  targets = {r.target for g in groups for r in g.runs if r.target is not None}
  if len(targets) == 1:
    tl = f"{100 * targets.pop():g}%"

  def tta_values(g: Group) -> list[float]:
    return [t for t in (r.time_to_target()[0] for r in g.completed)
            if t is not None]

  # (name, colormap, value of one group, best of several, format); bright
  # is good in every panel.
  metrics_spec = [
      ("test accuracy (%)", "viridis",
       lambda g: (100 * g.mean("test_accuracy")
                  if g.mean("test_accuracy") is not None else None),
       max, "{:.1f}"),
      ("train time (s)", "viridis_r", lambda g: g.mean("train_time_s"), min,
       "{:.0f}"),
      (f"time to {tl} (s)", "viridis_r",
       lambda g: metrics.mean_std(tta_values(g))[0] if tta_values(g) else None,
       min, "{:.0f}"),
  ]
  seeds = "means over seeds" if SEED_AXIS in axes else "single runs"
  if aggregate:
    how = ("each cell shows the best value over " +
           ", ".join(short[a] for a in others) +
           f" (highest accuracy, lowest times) of {seeds}")
  elif others:
    how = ("one row per combination of " + ", ".join(short[a] for a in others)
           + f"; cells are {seeds}")
  else:
    how = f"cells are {seeds}"

  # Fill every grid first so that each metric has one colour scale across
  # rows: the same colour means the same number everywhere in the figure.
  grids, texts = {}, {}
  for i, rk in enumerate(row_keys):
    members = [g for g in groups if rk is None or json.dumps(
        [g.settings.get(a) for a in others], default=str) == rk]
    for j, (_, _, value, best, fmt) in enumerate(metrics_spec):
      grid = np.full((len(norms), len(drops)), np.nan)
      text = [["not in sweep"] * len(drops) for _ in norms]
      for a, n in enumerate(norms):
        for b, d in enumerate(drops):
          cell = [g for g in members
                  if json.dumps(g.settings.get(NORM_AXIS)) == n
                  and json.dumps(g.settings.get(DROPOUT_AXIS)) == d]
          if not cell:
            continue
          done = [g for g in cell if g.completed]
          if not done:
            text[a][b] = cell[0].status if len(cell) == 1 else "failed"
            continue
          vals = [v for v in (value(g) for g in done) if v is not None]
          if vals:
            grid[a, b] = best(vals)
            text[a][b] = fmt.format(grid[a, b])
          else:
            text[a][b] = "never" if j == 2 else "-"
      grids[i, j], texts[i, j] = grid, text

  nrows = len(row_keys)
  fig = Figure(figsize=(4.8 * 3, 3.4 * nrows + 0.8), layout="constrained")
  axs = np.atleast_2d(fig.subplots(nrows, 3, squeeze=False))
  for j, (mname, cmap, _, _, _) in enumerate(metrics_spec):
    finite = np.concatenate([grids[i, j][np.isfinite(grids[i, j])]
                             for i in range(nrows)])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if hi == lo:
      lo, hi = lo - 0.5, hi + 0.5
    cm = matplotlib.colormaps[cmap].with_extremes(bad=(0.88, 0.88, 0.88))
    for i, rk in enumerate(row_keys):
      ax, grid = axs[i, j], grids[i, j]
      im = ax.imshow(np.ma.masked_invalid(grid), cmap=cm, vmin=lo, vmax=hi,
                     aspect="auto", origin="lower")
      if finite.size:
        cbar = fig.colorbar(im, ax=ax, shrink=0.9)
        cbar.set_label(mname + ("; brighter = faster" if j else ""))
      for a in range(len(norms)):
        for b in range(len(drops)):
          if np.isfinite(grid[a, b]):
            rgba = cm((grid[a, b] - lo) / (hi - lo))
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            color = "black" if lum > 0.5 else "white"
          else:
            color = (0.3, 0.3, 0.3)
          ax.text(b, a, texts[i, j][a][b], ha="center", va="center",
                  fontsize=9, color=color)
      ax.set_xticks(range(len(drops)),
                    [_fmt_value(json.loads(d)) for d in drops])
      ax.set_yticks(range(len(norms)),
                    [_fmt_value(json.loads(n)) for n in norms])
      if i == nrows - 1:
        ax.set_xlabel(f"dropout layers per block\n({DROPOUT_AXIS})")
      if j == 0:
        ax.set_ylabel(f"norm layers per block\n({NORM_AXIS})")
      if rk is None:
        sub = ("best over " + ", ".join(short[a] for a in others)
               if others else "")
      else:
        sub = ", ".join(f"{short[a]}={_fmt_value(v)}"
                        for a, v in zip(others, json.loads(rk)))
      ax.set_title(mname + (f"\n{sub}" if sub else ""), fontsize=10)
  fig.suptitle(f"{title}: norm layers x dropout layers\n({how})", fontsize=12)
  return _save(fig, path), how


def _load_misclassified(run: Run) -> dict[str, np.ndarray] | None:
  try:
    with np.load(run.misclassified, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    run.notes.append(f"misclassified.npz unreadable ({e})")
    return None
  missing = {"images", "labels", "preds"} - set(d)
  if missing:
    run.notes.append(f"misclassified.npz lacks {sorted(missing)}")
    return None
  return d


def _class_names(groups: Sequence[Group], k: int) -> list[str]:
  for g in groups:
    for r in g.runs:
      if r.misclassified is not None:
        d = _load_misclassified(r)
        if d is not None and "class_names" in d and len(d["class_names"]) == k:
          return [str(x) for x in d["class_names"]]
      known = KNOWN_CLASS_NAMES.get(r.dataset or "")
      if known and len(known) == k:
        return list(known)
  return [str(i) for i in range(k)]


def plot_misclassified(groups: Sequence[Group], path: Path, title: str
                       ) -> tuple[Path | None, str]:
  """One row of misclassified test images per group (its first run)."""
  rows = []
  for g in groups:
    runs = [r for r in g.completed if r.misclassified is not None]
    runs = runs or [r for r in g.runs if r.misclassified is not None]
    for r in runs[:1]:
      d = _load_misclassified(r)
      if d is not None and len(d["images"]):
        rows.append((g, r, d))
  if not rows:
    return None, ""
  note = ""
  if len(rows) > MAX_MISCLASSIFIED_ROWS:
    keep = sorted(rows, key=lambda x: -(x[0].mean("test_accuracy") or -1))
    keep = {id(x[0]) for x in keep[:MAX_MISCLASSIFIED_ROWS]}
    note = (f"the {MAX_MISCLASSIFIED_ROWS} most accurate of {len(rows)} "
            "variants")
    rows = [x for x in rows if id(x[0]) in keep]
  ncol = max(min(len(d["images"]), 10) for _, _, d in rows)
  fig = Figure(figsize=(1.55 * ncol + 1.2, 1.95 * len(rows) + 0.5),
               layout="constrained")
  axs = np.atleast_2d(fig.subplots(len(rows), ncol, squeeze=False))
  for i, (g, r, d) in enumerate(rows):
    names = ([str(x) for x in d["class_names"]] if "class_names" in d
             else None)
    if names is None and r.dataset in KNOWN_CLASS_NAMES:
      names = list(KNOWN_CLASS_NAMES[r.dataset])
    name = lambda c: names[c] if names and 0 <= c < len(names) else str(c)
    for j in range(ncol):
      ax = axs[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j >= len(d["images"]):
        ax.set_visible(False)
        continue
      img = np.asarray(d["images"][j])
      if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None,
                vmin=0, vmax=255, interpolation="nearest")
      t, p = int(d["labels"][j]), int(d["preds"][j])
      ax.set_title(f"true {name(t)} /\npred {name(p)}", fontsize=8)
      for spine in ax.spines.values():
        spine.set_edgecolor(g.color)
        spine.set_linewidth(2)
    label = g.label if len(g.label) <= 28 else g.label[:27] + "…"
    axs[i, 0].set_ylabel(label + (f"\n({r.name})" if len(g.runs) > 1 else ""),
                         fontsize=9, color=g.color, rotation=0, ha="right",
                         va="center", labelpad=8)
  per = " per variant" if len(rows) > 1 else ""
  fig.suptitle(f"{title}: misclassified test images (first {ncol}{per})",
               fontsize=12)
  return _save(fig, path), note


def _ordinal(x: float) -> str:
  if not float(x).is_integer():
    return f"{x:g}th"
  n = int(x)
  suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(
      n % 10, "th")
  return f"{n}{suffix}"


def plot_features(groups: Sequence[Group], path: Path, title: str
                  ) -> Path | None:
  """Tracked feature percentiles per epoch, one panel per percentile."""
  per_group = []
  layers = set()
  qkeys: list[str] = []
  for g in groups:
    runs = [r for r in g.plotted
            if any(isinstance(rec.get("features"), dict) for rec in r.history)]
    if runs:
      per_group.append((g, runs))
      for r in runs:
        for rec in r.history:
          f = rec.get("features")
          if isinstance(f, dict):
            if f.get("layer"):
              layers.add(str(f["layer"]))
            qkeys.extend(k for k in f if re.fullmatch(r"q[\d.]+", k)
                         and k not in qkeys)
  if not per_group or not qkeys:
    return None
  qkeys.sort(key=lambda k: float(k[1:]))
  ncols = 2 if len(qkeys) > 1 else 1
  nrows = math.ceil(len(qkeys) / ncols)
  fig = Figure(figsize=(6 * ncols, 3.8 * nrows + 0.5), layout="constrained")
  axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  handles, labels = [], []
  for ax, q in zip(axs, qkeys):
    for g, runs in per_group:
      ep, mean, lo, hi = _series(
          runs, q, get=lambda rec, q=q: (rec.get("features") or {}).get(q)
          if isinstance(rec.get("features"), dict) else None)
      if not len(ep):
        continue
      line, = ax.plot(ep, mean, color=g.color, lw=1.8 if g.highlight else 0.8,
                      marker="o" if len(ep) <= 25 and g.highlight else None,
                      ms=3, zorder=3 if g.highlight else 1)
      if len(runs) > 1 and g.highlight:
        ax.fill_between(ep, lo, hi, color=g.color, alpha=0.15, lw=0)
      if q == qkeys[0] and g.highlight:
        handles.append(line)
        labels.append(g.label)
    ax.set_title(f"{_ordinal(float(q[1:]))} percentile")
    ax.set_xlabel("epoch")
    ax.set_ylabel("feature value")
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
  for ax in axs[len(qkeys):]:
    ax.set_visible(False)
  others = sum(not g.highlight for g, _ in per_group)
  if others:
    handles.append(Line2D([], [], color=(0.6, 0.6, 0.6), lw=0.8))
    labels.append(f"{others} other variants")
  where = (f"layer {sorted(layers)[0]}" if len(layers) == 1 else
           "tracked layer" +
           (f"s {', '.join(sorted(layers))}" if layers else ""))
  fig.suptitle(f"{title}: percentiles of {where} activations per epoch",
               fontsize=13)
  _legend_below(fig, handles, labels)
  return _save(fig, path)


def plot_confusion(groups: Sequence[Group], best: Group | None, path: Path,
                   title: str) -> tuple[Path | None, str]:
  """Test confusion matrices (counts summed over seeds), row-normalised."""
  with_conf = []
  for g in groups:
    mats = []
    for r in g.completed:
      c = r.summary.get("test_confusion")
      if isinstance(c, list) and c:
        a = np.asarray(c, dtype=np.float64)
        if a.ndim == 2 and a.shape[0] == a.shape[1]:
          mats.append(a)
    shapes = {m.shape for m in mats}
    if mats and len(shapes) == 1:
      with_conf.append((g, np.sum(mats, axis=0), len(mats)))
  if not with_conf:
    return None, ""
  if len(with_conf) > MAX_CONFUSION_PANELS:
    chosen = [x for x in with_conf if x[0] is best] or with_conf[:1]
    what = "the best variant"
  else:
    chosen = with_conf
    what = "every variant" if len(chosen) > 1 else "the run"
  k = chosen[0][1].shape[0]
  names = _class_names([x[0] for x in chosen], k)
  side = min(max(4.5, 0.45 * k + 2.5), 14)
  ncols = min(len(chosen), 2)
  nrows = math.ceil(len(chosen) / ncols)
  fig = Figure(figsize=(side * ncols + 1, side * nrows * 0.92 + 0.4),
               layout="constrained")
  axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  for ax, (g, conf, n) in zip(axs, chosen):
    rows = conf.sum(axis=1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0) * 100
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=100)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of the true class")
    if k <= 15:
      for a in range(k):
        for b in range(k):
          ax.text(b, a, f"{int(conf[a, b])}", ha="center", va="center",
                  fontsize=8 if k > 10 else 9,
                  color="white" if rate[a, b] > 55 else "black")
    if k <= 30:
      ax.set_xticks(range(k), names[:k], rotation=45, ha="right", fontsize=8)
      ax.set_yticks(range(k), names[:k], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    seeds = f", counts summed over {n} seeds" if n > 1 else ""
    best_tag = " (best)" if g is best and len(groups) > 1 else ""
    ax.set_title(f"{g.label}{best_tag}\ntest set{seeds}", fontsize=10,
                 color=g.color if len(chosen) > 1 else "black")
  for ax in axs[len(chosen):]:
    ax.set_visible(False)
  fig.suptitle(f"{title}: test confusion "
               f"{'matrices' if len(chosen) > 1 else 'matrix'} "
               "(cell = count, colour = row-normalised %)", fontsize=12)
  return _save(fig, path), what


# --- The report -------------------------------------------------------------


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
  workdir = study.workdir
  out = Path(out) if out is not None else workdir / "report.md"
  fig_dir = workdir / "figures"
  groups = group_runs(study)
  best, best_key = best_group(groups)
  seeded = SEED_AXIS in study.axes
  title = study.name
  notes = list(study.notes)

  def link(p: Path) -> str:
    return Path(os.path.relpath(p.resolve(), out.parent.resolve())).as_posix()

  md = [f"# {study.name}", ""]
  counts = collections.Counter(r.status for r in study.runs)
  kind = "Sweep" if study.is_sweep else "Single run"
  md.append(f"{kind} in `{workdir}`: {len(study.runs)} run"
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
  md += ["", "## Results", ""]
  if seeded:
    md.append("One row per setting; values are mean ± sample std over its "
              "completed seeds (\"seeds\" = completed/total). Accuracy and F1 "
              "in %, times in seconds.")
  else:
    md.append("Accuracy and F1 in %, times in seconds.")
  md += ["", render_table(summary_rows(study, groups)), ""]

  md += ["## Best variant", ""]
  if best is None:
    md.append("No run completed, so there is no best variant.")
  else:
    accs = best.values("test_accuracy")
    basis = ("validation accuracy" if best_key == "val_accuracy"
             else "test accuracy")
    if any(len(g.completed) > 1 for g in groups):
      basis = "mean " + basis
    line = (f"**{best.label}** (highest {basis}): test accuracy "
            f"{_pm(accs, 100)}%")
    if best_key == "val_accuracy":
      line += f", validation accuracy {_pm(best.values('val_accuracy'), 100)}%"
    line += f", train time {_pm(best.values('train_time_s'), digits=1)} s"
    tta = _tta_cell(best.completed, 0, 1, unit=" s")
    if tta != "-":
      line += f", time to {_target_label(study)}: {tta}"
    if len(best.runs) > 1:
      line += f" ({len(best.completed)} seeds)"
    md.append(line + ".")
    if study.is_sweep:
      md.append("Run director" + ("ies" if len(best.completed) > 1 else "y") +
                ": " + ", ".join(f"`{link(r.path)}`" for r in best.completed)
                + ".")
  md.append("")

  if seeded:
    md += ["## Runs", "", "Every run behind the table above.", "",
           render_table(run_rows(study)), ""]

  figs = []

  def attempt(name: str, fn: Callable[[], Any]) -> Any:
    try:
      return fn()
    except Exception as e:  # A broken figure must not cost the whole report.
      notes.append(f"figure {name} failed: {type(e).__name__}: {e}")
      return None

  p = attempt("curves", lambda: plot_curves(groups, fig_dir / "curves.png",
                                            title))
  if p:
    figs.append(("Training curves", p,
                 "Train and test loss and accuracy per epoch, one colour per "
                 "variant" + (" (mean over seeds; band = min..max)" if seeded
                              else "") + "."))
  r = attempt("heatmaps", lambda: plot_heatmaps(
      groups, study.axes, fig_dir / "heatmaps.png", title))
  if r and r[0]:
    figs.append(("Norm layers x dropout layers", r[0],
                 "Test accuracy, training time and time to target over "
                 f"`{NORM_AXIS}` x `{DROPOUT_AXIS}`: {r[1]}. Grey cells were "
                 "not run, failed, or never reached the target."))
  p = attempt("features", lambda: plot_features(
      groups, fig_dir / "features.png", title))
  if p:
    figs.append(("Feature percentiles", p,
                 "1st/20th/80th/99th percentiles of the tracked layer's "
                 "activations per epoch, one colour per variant."))
  r = attempt("confusion", lambda: plot_confusion(
      groups, best, fig_dir / "confusion.png", title))
  if r and r[0]:
    figs.append(("Confusion matrix", r[0],
                 f"Test confusion matrix of {r[1]}: rows are true classes, "
                 "columns predictions; colour is the share of the true class."))
  r = attempt("misclassified", lambda: plot_misclassified(
      groups, fig_dir / "misclassified.png", title))
  if r and r[0]:
    figs.append(("Misclassified test images", r[0],
                 "The first misclassified test images of each variant"
                 + (" (its first seed)" if seeded else "")
                 + (f", for {r[1]}" if r[1] else "") + "."))
  if figs:
    md += ["## Figures", ""]
    for name, p, caption in figs:
      md += [f"### {name}", "", caption, "", f"![{name}]({link(p)})", ""]

  for run in study.runs:
    notes.extend(f"`{run.name}`: {n}" for n in run.notes)
  notes = list(dict.fromkeys(notes))  # a file may be read by two figures
  if notes:
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  out.parent.mkdir(parents=True, exist_ok=True)
  results.write_atomic(out, "\n".join(md))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxreg.report",
      description="Write report.md with tables and figures for a sweep or "
                  "run directory.")
  parser.add_argument("workdir", help="sweep or run directory")
  parser.add_argument("--out", default=None,
                      help="markdown file (default <workdir>/report.md)")
  args = parser.parse_args(argv)
  try:
    path = build_report(args.workdir, args.out)
  except ValueError as e:
    parser.error(str(e))
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
