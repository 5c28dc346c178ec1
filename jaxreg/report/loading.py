"""Reading what runs and sweeps leave behind, tolerantly.

Every problem (a missing, unreadable or half-written file) becomes a note
and a status on the run, never an exception: the report must work on a
sweep that is still running or partly failed. File formats: results.py
(run directories) and sweep.py (sweep.json, summary.csv).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxreg import metrics
from jaxreg import results


def to_float(v: Any) -> float | None:
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


def finite(v: Any) -> float | None:
  """`to_float(v)` when it is finite, else None."""
  x = to_float(v)
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
    v = finite(self.summary.get(key))
    if v is None and key not in self.summary:
      for rec in reversed(self.history):
        if key in rec:
          return finite(rec[key])
    return v

  @property
  def target(self) -> float | None:
    t = finite(self.summary.get("target_accuracy"))
    return t if t is not None else finite(self.config.get("target_accuracy"))

  def time_to_target(self) -> tuple[float | None, float | None]:
    """(seconds, epochs) to the target, None where never reached."""
    if "time_to_target_s" in self.summary:
      return (finite(self.summary.get("time_to_target_s")),
              finite(self.summary.get("epochs_to_target")))
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


def read_json(path: Path, notes: list[str]) -> Any:
  """`results.read_json`, or None with a note when the file is unreadable."""
  try:
    return results.read_json(path)
  except (OSError, ValueError) as e:
    notes.append(f"{path.name} unreadable ({type(e).__name__}: {e})")
    return None


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
  """`results.read_jsonl`'s records; a broken line is skipped with a note."""
  try:
    rows = results.read_jsonl(path)
  except OSError as e:
    notes.append(f"{path.name} unreadable ({e})")
    return []
  except ValueError:
    # Salvage the readable lines of a file someone appended to by hand or
    # cut short (results.py itself only ever writes whole files).
    rows = []
    for i, line in enumerate(
        path.read_text(errors="replace").splitlines(), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except ValueError:
        notes.append(f"{path.name} line {i} is not JSON; skipped")
  return [r for r in rows if isinstance(r, dict)]


def load_misclassified(run: Run) -> dict[str, np.ndarray] | None:
  """The arrays of `run`'s misclassified.npz, or None with a note."""
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


def load_run(path: str | os.PathLike, name: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> Run:
  """Reads one run directory; problems become notes and a status, not errors."""
  path = Path(path)
  run = Run(name=name or path.name, path=path, overrides=dict(overrides or {}))
  if not path.is_dir():
    run.notes.append("run directory missing")
    return run
  if (path / "summary.json").exists():
    summary = read_json(path / "summary.json", run.notes)
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
    run.history = read_jsonl(path / "metrics.jsonl", run.notes)
  elif run.status in ("completed", "running"):
    run.notes.append("metrics.jsonl missing")
  for attr, fname in (("config", "config.json"), ("env", "env.json")):
    if (path / fname).exists():
      obj = read_json(path / fname, run.notes)
      if isinstance(obj, dict):
        setattr(run, attr, obj)
  if (path / "misclassified.npz").exists():
    run.misclassified = path / "misclassified.npz"
  return run


def parse_cell(text: str) -> Any:
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
  """Everything read from a workdir.

  `heatmaps` are the (row axis, column axis) pairs the study file's
  `get_report()` declared (sweep.json's "report" entry; see
  declared_heatmaps), in its order.
  """
  workdir: Path
  name: str
  axes: list[str]
  runs: list[Run]
  is_sweep: bool
  notes: list[str] = dataclasses.field(default_factory=list)
  heatmaps: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  # The study file's baseline (get_report()["baseline"]: dotted overrides or
  # a variant name), None when it names none.
  baseline: Any = None
  # Axes along which the baseline repeats (get_report()["baseline_within"]).
  baseline_within: list = dataclasses.field(default_factory=list)
  # Seeds the sweep asked for per variant (sweep.json "num_seeds").
  num_seeds: int = 1


def _in_config(config: Mapping[str, Any], key: str) -> bool:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return False
    node = node[part]
  return True


def declared_heatmaps(spec: Mapping[str, Any], runs: list[Run],
                      notes: list[str]) -> list[tuple[str, str]]:
  """The heatmap axis pairs of sweep.json's "report" entry.

  A malformed entry is a note. So is an axis that no run's config knows (a
  misspelled key), while a known axis that this sweep does not vary is not:
  a study's smaller modes (`:full`) may hold a declared grid's axes fixed.
  """
  declared = spec.get("report") or {}
  if not isinstance(declared, Mapping):
    notes.append(f"sweep.json report is not a mapping; ignored (got "
                 f"{declared!r})")
    return []
  pairs = declared.get("heatmaps")
  if pairs is None:
    return []
  if not isinstance(pairs, list) or not all(
      isinstance(p, list) and len(p) == 2 and all(isinstance(a, str) for a in p)
      for p in pairs):
    notes.append("sweep.json report.heatmaps is not a list of [row axis, "
                 f"column axis] pairs; no heatmaps drawn (got {pairs!r})")
    return []
  configs = [r.config for r in runs if r.config]
  out = []
  for row, col in pairs:
    unknown = [a for a in (row, col) if configs and not any(
        _in_config(c, a) for c in configs)]
    if unknown:
      notes.append(f"heatmap {row} x {col} not drawn: no run's config has "
                   f"{', '.join(unknown)}")
      continue
    out.append((row, col))
  return out


def _read_summary_csv(path: Path, notes: list[str]
                      ) -> tuple[list[str], dict[str, dict]]:
  """summary.csv's axis columns and its rows by variant name."""
  rows: dict[str, dict] = {}
  axes: list[str] = []
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      axes = [c for c in reader.fieldnames or ()
              if c not in ("variant", "status", *results.SUMMARY_COLUMNS)]
      for row in reader:
        if row.get("variant"):
          rows[row["variant"]] = row
  except (OSError, csv.Error) as e:
    notes.append(f"summary.csv unreadable ({e})")
  return axes, rows


def _load_sweep(workdir: Path, notes: list[str]) -> Study:
  spec: dict = {}
  if (workdir / "sweep.json").exists():
    obj = read_json(workdir / "sweep.json", notes)
    spec = obj if isinstance(obj, dict) else {}
  csv_axes, csv_rows = ([], {})
  if (workdir / "summary.csv").exists():
    csv_axes, csv_rows = _read_summary_csv(workdir / "summary.csv", notes)
  axes = list(spec.get("axes") or csv_axes)
  variants = [v for v in spec.get("variants") or () if isinstance(v, dict)
              and v.get("name")]
  listed = {v["name"] for v in variants}
  for name, row in csv_rows.items():
    if name not in listed:
      variants.append({"name": name, "overrides": {
          a: parse_cell(row.get(a, "")) for a in axes}})
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
      run.summary = {k: parse_cell(row[k]) for k in results.SUMMARY_COLUMNS
                     if row.get(k, "") != ""}
      if "time_to_target_s" not in run.summary and run.completed:
        run.summary["time_to_target_s"] = None
    runs.append(run)
  name = spec.get("study")
  if not name:
    name = next((r.config.get("name") for r in runs if r.config.get("name")),
                workdir.name)
  report = spec.get("report") if isinstance(spec.get("report"), dict) else {}
  num_seeds = spec.get("num_seeds")
  return Study(workdir, str(name), axes, runs, True, notes,
               declared_heatmaps(spec, runs, notes), report.get("baseline"),
               list(report.get("baseline_within") or ()), num_seeds if isinstance(num_seeds, int) and num_seeds > 0
               else 1)


def load_study(workdir: str | os.PathLike) -> Study:
  """Reads a sweep directory (sweep.json / summary.csv) or a single run."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise ValueError(f"{workdir} is not a directory; pass a sweep or run "
                     "directory")
  notes: list[str] = []
  if (workdir / "sweep.json").exists() or (workdir / "summary.csv").exists():
    return _load_sweep(workdir, notes)
  if any((workdir / f).exists() for f in ("summary.json", "metrics.jsonl")):
    run = load_run(workdir)
    run.name = str(run.summary.get("variant") or run.config.get("name") or
                   workdir.name)
    name = run.config.get("name") or run.name
    return Study(workdir, str(name), [], [run], False, notes)
  raise ValueError(f"{workdir} holds neither sweep.json/summary.csv (a sweep) "
                   "nor summary.json/metrics.jsonl (a run); pass the directory "
                   "given to launch.py as --workdir")
