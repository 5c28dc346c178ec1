"""Runs grouped over seeds: one Group per setting, with its colour and rank.

Variants that differ only in the `seed` axis are repeats of one setting; a
Group holds them and answers means over its completed seeds. Each group
keeps one colour in every figure.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any, Mapping, Sequence

import matplotlib

from jaxreg import metrics
from jaxreg.report.loading import Run, Study

SEED_AXIS = "seed"
# Up to this many groups each gets its own tab10 colour; beyond, only the
# best this many do and the rest are drawn in grey, so legends stay readable.
NUM_COLORS = 10


def fmt_value(v: Any) -> str:
  """An axis value as written in labels and tables: 0.2, [0.1, 0.2], batch."""
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(fmt_value(x) for x in v) + "]"
  return str(v)


def short_names(axes: Sequence[str]) -> dict[str, str]:
  """Last dotted component, unless two axes would then share a name."""
  last = [a.rsplit(".", 1)[-1] for a in axes]
  return {a: (s if last.count(s) == 1 else a) for a, s in zip(axes, last)}


def describe(settings: Mapping[str, Any], short: Mapping[str, str]) -> str:
  """"norm_layers=2, dropout=0.2": axis values under their short names."""
  return ", ".join(f"{short[a]}={fmt_value(v)}" for a, v in settings.items())


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
  short = short_names(other)
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
      g.label = describe(g.settings, short)
    else:
      g.label = study.name
  labels = [g.label for g in out]
  if len(set(labels)) != len(labels):  # e.g. names that differ only in seed
    for g in out:
      g.label = describe(g.settings, short) or g.label
  assign_colors(out)
  return out


def ranking_key(groups: Sequence[Group]) -> str:
  """Validation accuracy if every completed group has one, else test."""
  cands = [g for g in groups if g.values("test_accuracy")]
  if cands and all(g.values("val_accuracy") for g in cands):
    return "val_accuracy"
  return "test_accuracy"


def best_group(groups: Sequence[Group]) -> tuple[Group | None, str]:
  """The group with the highest mean of `ranking_key`, and that key."""
  cands = [g for g in groups if g.values("test_accuracy")]
  if not cands:
    return None, ""
  key = ranking_key(cands)
  return max(cands, key=lambda g: g.mean(key)), key


def assign_colors(groups: Sequence[Group]) -> None:
  """One colour per group for every figure: tab10, or the best 10 + greys."""
  if len(groups) <= NUM_COLORS:
    best = list(groups)
  else:
    key = ranking_key(groups)
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
