"""Misclassified test images (misclassified.npz): one row per group, its
first run, with true and predicted labels."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxreg.report.figures import common
from jaxreg.report.figures.registry import FigureSpec, drawn_once
from jaxreg.report.grouping import Group
from jaxreg.report.loading import load_misclassified

MAX_MISCLASSIFIED_ROWS = 12


def plot_misclassified(groups: Sequence[Group], path: Path, title: str
                       ) -> tuple[Path | None, str]:
  """One row of misclassified test images per group (its first run).

  Returns the path and, when only the most accurate groups fit, a phrase
  saying so (else "").
  """
  rows = []
  for g in groups:
    runs = [r for r in g.completed if r.misclassified is not None]
    runs = runs or [r for r in g.runs if r.misclassified is not None]
    for r in runs[:1]:
      d = load_misclassified(r)
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
    names = common.run_class_names(r, d)
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
  return common.save(fig, path), note


FIGURE = FigureSpec(
    name="misclassified",
    applies=lambda ctx, item: any(r.misclassified is not None
                                  for r in ctx.study.runs),
    draw=drawn_once(
        "Misclassified test images", "misclassified.png",
        lambda ctx, path: plot_misclassified(ctx.groups, path, ctx.title)),
    caption=lambda ctx, drawn: (
        "The first misclassified test images of each variant"
        + (" (its first seed)" if ctx.seeded else "")
        + (f", for {drawn.detail}" if drawn.detail else "") + "."))
