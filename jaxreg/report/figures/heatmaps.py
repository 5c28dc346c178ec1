"""Heatmaps over two axes a study declares: test accuracy, train time and
time to target per cell.

A study file's `get_report()` names the pairs (`{"heatmaps": [[row axis,
column axis], ...]}`; sweep.run stores it in sweep.json). One figure per
declared pair whose two axes the sweep varies: `figures/heatmaps.png` when
the study declares a single pair, else `figures/heatmap_<row>_x_<col>.png`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jaxreg import metrics
from jaxreg.report import stats
from jaxreg.report.figures import common
from jaxreg.report.figures.registry import Context, Drawn, FigureSpec
from jaxreg.report.grouping import (SEED_AXIS, Group, describe, fmt_value,
                                    short_names)
from jaxreg.report.tables import target_label

# One row of heatmaps per combination of the other axes up to this many;
# beyond it they show the best over the other axes.
MAX_HEATMAP_ROWS = 6


def _sort_key(v: Any) -> tuple:
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return (0, float(v), "")
  return (1, 0.0, json.dumps(v, default=str))


def _values(groups: Sequence[Group], axis: str) -> list[str]:
  """The JSON texts of `axis`'s values over `groups`, sorted."""
  return sorted({json.dumps(g.settings.get(axis)) for g in groups},
                key=lambda s: _sort_key(json.loads(s)))


def _words(axis: str, short: dict[str, str]) -> str:
  """"model.norm_layers" -> "norm layers"."""
  return short.get(axis, axis).replace("_", " ")


def _metric_specs(groups: Sequence[Group]) -> list[tuple]:
  """(name, colormap, value of one group, best of several, format) per
  panel; bright is good in every panel."""
  tl = target_label([r for g in groups for r in g.runs])

  def tta_values(g: Group) -> list[float]:
    return [t for t in (r.time_to_target()[0] for r in g.completed)
            if t is not None]

  return [
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


def _fill(members: Sequence[Group], pair: tuple[str, str],
          rows: list[str], cols: list[str], value: Callable,
          best: Callable, fmt: str, never: str
          ) -> tuple[np.ndarray, list[list[str]]]:
  """One panel's grid of values and the text of each cell."""
  row_axis, col_axis = pair
  grid = np.full((len(rows), len(cols)), np.nan)
  text = [["not in sweep"] * len(cols) for _ in rows]
  for a, rv in enumerate(rows):
    for b, cv in enumerate(cols):
      cell = [g for g in members
              if json.dumps(g.settings.get(row_axis)) == rv
              and json.dumps(g.settings.get(col_axis)) == cv]
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
        text[a][b] = never
  return grid, text


def _marks(members: Sequence[Group], pair: tuple[str, str], rows: list[str],
           cols: list[str], verdicts: Mapping[str, str],
           baselines: Sequence[str]) -> list[list[str]]:
  """Per cell of one setting: "baseline", its verdict against the baseline
  (test accuracy), or ""."""
  out = [[""] * len(cols) for _ in rows]
  for a, rv in enumerate(rows):
    for b, cv in enumerate(cols):
      cell = [g for g in members
              if json.dumps(g.settings.get(pair[0])) == rv
              and json.dumps(g.settings.get(pair[1])) == cv]
      if len(cell) == 1:
        label = cell[0].label
        out[a][b] = ("baseline" if label in baselines
                     else verdicts.get(label, ""))
  return out


def plot_heatmaps(groups: Sequence[Group], axes: Sequence[str],
                  pair: tuple[str, str], path: Path, title: str,
                  verdicts: Mapping[str, str] | None = None,
                  baselines: Sequence[str] = ()) -> tuple[Path | None, str]:
  """Test accuracy, train time and time to target over `pair`'s two axes.

  Args:
    groups: the study's groups.
    axes: the study's axes.
    pair: (row axis, column axis), dotted keys; both must be in `axes`.
    path: the PNG to write.
    title: the study's name, for the figure's title.
    verdicts: group label -> its test-accuracy verdict against the
      baseline (comparison.Analysis); cells "not distinguishable" from the
      baseline are hatched and marked "≈" in the accuracy panel.
    baselines: the baseline groups' labels (their cells are outlined).

  Returns:
    The path (None when an axis of `pair` is not in `axes`) and a sentence
    for the report saying what the rows of heatmaps are.
  """
  row_axis, col_axis = pair
  if row_axis not in axes or col_axis not in axes:
    return None, ""
  others = [a for a in axes if a not in (row_axis, col_axis, SEED_AXIS)]
  short = short_names(list(axes))
  rows, cols = _values(groups, row_axis), _values(groups, col_axis)
  combos: list[str] = []
  for g in groups:
    c = json.dumps([g.settings.get(a) for a in others], default=str)
    if c not in combos:
      combos.append(c)
  aggregate = len(combos) > MAX_HEATMAP_ROWS
  row_keys = [None] if aggregate else combos
  specs = _metric_specs(groups)
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
  grids, texts, marks = {}, {}, {}
  for i, rk in enumerate(row_keys):
    members = [g for g in groups if rk is None or json.dumps(
        [g.settings.get(a) for a in others], default=str) == rk]
    # An aggregated cell holds several settings: no single verdict.
    marks[i] = (_marks(members, pair, rows, cols, verdicts or {}, baselines)
                if rk is not None or not others else None)
    for j, (_, _, value, best, fmt) in enumerate(specs):
      grids[i, j], texts[i, j] = _fill(members, pair, rows, cols, value, best,
                                       fmt, "never" if j == 2 else "-")

  nrows = len(row_keys)
  fig = Figure(figsize=(4.8 * 3, 3.4 * nrows + 0.8), layout="constrained")
  axs = np.atleast_2d(fig.subplots(nrows, 3, squeeze=False))
  for j, (mname, cmap, _, _, _) in enumerate(specs):
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
      for a in range(len(rows)):
        for b in range(len(cols)):
          if np.isfinite(grid[a, b]):
            rgba = cm((grid[a, b] - lo) / (hi - lo))
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            color = "black" if lum > 0.5 else "white"
          else:
            color = (0.3, 0.3, 0.3)
          mark = marks[i][a][b] if j == 0 and marks[i] else ""
          label = texts[i, j][a][b] + {"baseline": "\nbaseline",
                                       stats.SAME: " ≈"}.get(mark, "")
          if mark == stats.SAME:
            ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False,
                                   hatch="///", edgecolor=color, lw=0,
                                   alpha=0.5))
          elif mark == "baseline":
            ax.add_patch(Rectangle((b - 0.48, a - 0.48), 0.96, 0.96,
                                   fill=False, edgecolor="red", lw=2.5))
          ax.text(b, a, label, ha="center", va="center",
                  fontsize=9, color=color)
      ax.set_xticks(range(len(cols)), [fmt_value(json.loads(c)) for c in cols])
      ax.set_yticks(range(len(rows)), [fmt_value(json.loads(r)) for r in rows])
      if i == nrows - 1:
        ax.set_xlabel(f"{_words(col_axis, short)}\n({col_axis})")
      if j == 0:
        ax.set_ylabel(f"{_words(row_axis, short)}\n({row_axis})")
      if rk is None:
        sub = ("best over " + ", ".join(short[a] for a in others)
               if others else "")
      else:
        sub = describe(dict(zip(others, json.loads(rk))), short)
      ax.set_title(mname + (f"\n{sub}" if sub else ""), fontsize=10)
  fig.suptitle(f"{title}: {_words(row_axis, short)} x "
               f"{_words(col_axis, short)}\n({how})", fontsize=12)
  return common.save(fig, path), how


def file_name(pair: tuple[str, str],
              declared: Sequence[tuple[str, str]]) -> str:
  """heatmaps.png for a study's only pair, else heatmap_<row>_x_<col>.png."""
  if len(declared) == 1:
    return "heatmaps.png"
  short = short_names(sorted({a for p in declared for a in p}))
  row, col = (re.sub(r"[^\w.-]+", "-", short[a]) for a in pair)
  return f"heatmap_{row}_x_{col}.png"


def _verdicts(ctx: Context) -> tuple[dict[str, str], list[str]]:
  a = ctx.analysis
  if a is None or a.baseline is None:
    return {}, []
  return ({k: c.verdict for k, c in
           a.comparisons.get("test_accuracy", {}).items()},
          [g.label for g in a.baselines])


def _draw(ctx: Context, pair: tuple[str, str]) -> Drawn | None:
  verdicts, baselines = _verdicts(ctx)
  path, how = plot_heatmaps(ctx.groups, ctx.study.axes, pair,
                            ctx.fig_dir / file_name(pair, ctx.study.heatmaps),
                            ctx.title, verdicts, baselines)
  if path is None:
    return None
  short = short_names(list(ctx.study.axes))
  words = f"{_words(pair[0], short)} x {_words(pair[1], short)}"
  return Drawn(words[:1].upper() + words[1:], path, how, pair)


def _caption(ctx: Context, drawn: Drawn) -> str:
  row_axis, col_axis = drawn.item
  text = ("Test accuracy, training time and time to target over "
          f"`{row_axis}` x `{col_axis}`: {drawn.detail}. Grey cells were "
          "not run, failed, or never reached the target.")
  _, baselines = _verdicts(ctx)
  if baselines:
    several = len(baselines) > 1
    text += (f" In the accuracy panel the baseline{'s' if several else ''} "
             f"({'; '.join(baselines)}) {'are' if several else 'is'} "
             "outlined in red, and hatched cells marked ≈ are not "
             "distinguishable from their baseline (Holm-corrected Welch "
             "test, 5%).")
  return text


FIGURE = FigureSpec(
    name="heatmaps",
    items=lambda ctx: ctx.study.heatmaps,
    applies=lambda ctx, pair: all(a in ctx.study.axes for a in pair),
    draw=_draw, caption=_caption)
