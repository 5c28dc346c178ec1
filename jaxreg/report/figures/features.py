"""Feature percentiles: the tracked layer's activation percentiles per epoch
(train.feature_layer), one panel per percentile."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxreg.report.figures import common
from jaxreg.report.figures.registry import FigureSpec, drawn_once
from jaxreg.report.grouping import Group
from jaxreg.report.loading import Run


def _ordinal(x: float) -> str:
  if not float(x).is_integer():
    return f"{x:g}th"
  n = int(x)
  suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(
      n % 10, "th")
  return f"{n}{suffix}"


def _has_features(run: Run) -> bool:
  return any(isinstance(rec.get("features"), dict) for rec in run.history)


def _feature(rec: dict, q: str) -> Any:
  f = rec.get("features")
  return f.get(q) if isinstance(f, dict) else None


def plot_features(groups: Sequence[Group], path: Path, title: str
                  ) -> Path | None:
  """Tracked feature percentiles per epoch, one panel per percentile."""
  per_group = []
  layers = set()
  qkeys: list[str] = []
  for g in groups:
    runs = [r for r in g.plotted if _has_features(r)]
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
      ep, mean, lo, hi = common.series(
          runs, q, get=lambda rec, q=q: _feature(rec, q))
      if not len(ep):
        continue
      line = common.plot_group(ax, g, ep, mean, lo, hi, len(runs))
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
  common.add_others(handles, labels, sum(not g.highlight for g, _ in per_group))
  where = (f"layer {sorted(layers)[0]}" if len(layers) == 1 else
           "tracked layer" +
           (f"s {', '.join(sorted(layers))}" if layers else ""))
  fig.suptitle(f"{title}: percentiles of {where} activations per epoch",
               fontsize=13)
  common.legend_below(fig, handles, labels)
  return common.save(fig, path)


FIGURE = FigureSpec(
    name="features",
    applies=lambda ctx, item: any(_has_features(r) for g in ctx.groups
                                  for r in g.plotted),
    draw=drawn_once(
        "Feature percentiles", "features.png",
        lambda ctx, path: plot_features(ctx.groups, path, ctx.title)),
    caption=lambda ctx, drawn: (
        "1st/20th/80th/99th percentiles of the tracked layer's activations "
        "per epoch, one colour per variant."))
