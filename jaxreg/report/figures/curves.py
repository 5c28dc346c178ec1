"""Training curves: train/test loss and accuracy per epoch, every group on
shared axes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxreg.report.figures import common
from jaxreg.report.figures.registry import (Context, Drawn, FigureSpec,
                                            drawn_once)
from jaxreg.report.grouping import Group


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
      ep, mean, lo, hi = common.series(g.plotted, key, scale)
      if not len(ep):
        continue
      common.plot_group(ax, g, ep, mean, lo, hi, len(g.plotted))
      if has_val and key.startswith("test_"):
        vep, vmean, _, _ = common.series(g.plotted, "val_" + key[5:], scale)
        if len(vep):
          ax.plot(vep, vmean, color=g.color, lw=1.2 if g.highlight else 0.6,
                  ls="--", zorder=2 if g.highlight else 1)
    title_extra = (" (solid) and validation (dashed)"
                   if has_val and key.startswith("test_") else "")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    title_extra += _scale_axis(ax, key, ylabel)
    ax.set_title(name + title_extra)
  for ax in axs[1]:
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
  handles, labels = [], []
  for g in groups:
    if g.highlight:
      handles.append(Line2D([], [], color=g.color, lw=1.8, marker="o", ms=3))
      labels.append(g.label + ("" if g.completed else f" ({g.status})"))
  common.add_others(handles, labels, sum(not g.highlight for g in groups),
                    " (grey)")
  sub = "mean over seeds, band = min..max" if seeded else ""
  fig.suptitle(f"{title}: training curves" + (f" ({sub})" if sub else ""),
               fontsize=14)
  common.legend_below(fig, handles, labels)
  return common.save(fig, path)


def _scale_axis(ax: Axes, key: str, ylabel: str) -> str:
  """Log scale for losses spanning decades, a zoom for accuracies that
  plateau; returns what to add to the panel's title."""
  lines = [np.asarray(l.get_ydata(), float) for l in ax.get_lines()]
  ys = np.concatenate(lines) if lines else np.zeros(0)
  ys = ys[np.isfinite(ys)]
  if key.endswith("loss"):
    if ys.size and ys.min() > 0 and ys.max() / ys.min() > 20:
      ax.set_yscale("log")
      ax.set_ylabel(ylabel + " (log scale)")
    return ""
  if not ys.size:
    return ""
  # Accuracy often climbs fast and then differs by tenths of a point
  # (MNIST): zoom on the second half of training when the first half would
  # flatten it.
  late = np.concatenate([l[len(l) // 2:] for l in lines if len(l) >= 4]
                        or [np.zeros(0)])
  late = late[np.isfinite(late)]
  if late.size:
    hi, lo = ys.max(), late.min()
    if hi - ys.min() > 4 * max(hi - lo, 1e-9):
      pad = max(hi - lo, 0.1)
      ax.set_ylim(lo - 0.15 * pad, min(hi + 0.1 * pad, 100.5))
      return ", zoomed on the 2nd half of training"
  return ""


def _caption(ctx: Context, drawn: Drawn) -> str:
  del drawn
  return ("Train and test loss and accuracy per epoch, one colour per "
          "variant" + (" (mean over seeds; band = min..max)" if ctx.seeded
                       else "") + ".")


FIGURE = FigureSpec(
    name="curves",
    applies=lambda ctx, item: any(g.plotted for g in ctx.groups),
    draw=drawn_once("Training curves", "curves.png",
                    lambda ctx, path: plot_curves(ctx.groups, path, ctx.title)),
    caption=_caption)
