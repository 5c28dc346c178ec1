"""Test confusion matrices (summary.json's test_confusion), counts summed
over seeds, coloured by the row-normalised rate."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxreg.report.figures import common
from jaxreg.report.figures.registry import FigureSpec, drawn_once
from jaxreg.report.grouping import Group
from jaxreg.report.loading import Run

# One confusion matrix per group up to this many groups, else the best only.
MAX_CONFUSION_PANELS = 4


def _confusion(run: Run) -> np.ndarray | None:
  """A completed run's square test confusion matrix, if it logged one."""
  c = run.summary.get("test_confusion")
  if isinstance(c, list) and c:
    a = np.asarray(c, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == a.shape[1]:
      return a
  return None


def plot_confusion(groups: Sequence[Group], best: Group | None, path: Path,
                   title: str) -> tuple[Path | None, str]:
  """Test confusion matrices (counts summed over seeds), row-normalised.

  Returns the path and which groups it shows ("every variant", "the best
  variant", "the run").
  """
  with_conf = []
  for g in groups:
    mats = [m for m in map(_confusion, g.completed) if m is not None]
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
  names = common.class_names([x[0] for x in chosen], k)
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
  return common.save(fig, path), what


FIGURE = FigureSpec(
    name="confusion",
    applies=lambda ctx, item: any(_confusion(r) is not None
                                  for g in ctx.groups for r in g.completed),
    draw=drawn_once(
        "Confusion matrix", "confusion.png",
        lambda ctx, path: plot_confusion(ctx.groups, ctx.best, path,
                                         ctx.title)),
    caption=lambda ctx, drawn: (
        f"Test confusion matrix of {drawn.detail}: rows are true classes, "
        "columns predictions; colour is the share of the true class."))
