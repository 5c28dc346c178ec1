"""Plotting helpers shared by the figures: saving, per-epoch series, the
line-and-band of a group, legends and class names."""
from __future__ import annotations

import collections
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxreg import results
from jaxreg.report.grouping import Group
from jaxreg.report.loading import Run, load_misclassified, to_float

DPI = 120
# Fallback class names for when no misclassified.npz carries them.
KNOWN_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                "horse", "ship", "truck"),
    "svhn_cropped": tuple(str(i) for i in range(10)),
}


def save(fig: Figure, path: Path) -> Path:
  """Writes `fig` as a PNG, atomically; returns `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight",
              facecolor="white")
  results.write_atomic(path, buf.getvalue())
  return path


def series(runs: Sequence[Run], key: str, scale: float = 1.0,
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
      v = to_float(get(rec) if get else rec.get(key))
      if v is not None:
        by_epoch[int(rec.get("epoch", i + 1))].append(
            v * scale if math.isfinite(v) else math.nan)
  epochs = np.array(sorted(by_epoch), dtype=float)
  vals = [np.array(by_epoch[int(e)]) for e in epochs]
  mean = np.array([v.mean() for v in vals])
  lo = np.array([v.min() for v in vals])
  hi = np.array([v.max() for v in vals])
  return epochs, mean, lo, hi


def plot_group(ax: Axes, g: Group, epochs: np.ndarray, mean: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, num_runs: int) -> Line2D:
  """A group's mean line, bold when highlighted, with its min..max band
  when it has several runs."""
  line, = ax.plot(epochs, mean, color=g.color, lw=1.8 if g.highlight else 0.8,
                  marker="o" if len(epochs) <= 25 and g.highlight else None,
                  ms=3, zorder=3 if g.highlight else 1)
  if num_runs > 1 and g.highlight:
    ax.fill_between(epochs, lo, hi, color=g.color, alpha=0.15, lw=0)
  return line


def add_others(handles: list, labels: list[str], count: int,
               suffix: str = "") -> None:
  """One grey legend entry for the `count` groups without their own colour."""
  if count:
    handles.append(Line2D([], [], color=(0.6, 0.6, 0.6), lw=0.8))
    labels.append(f"{count} other variants{suffix}")


def legend_below(fig: Figure, handles: list, labels: list[str]) -> None:
  ncol = max(1, min(len(labels), 3 if max(map(len, labels)) > 30 else 4))
  fig.legend(handles, labels, loc="outside lower center", ncol=ncol,
             frameon=False, fontsize=9)


def run_class_names(run: Run, arrays: dict[str, np.ndarray] | None
                    ) -> list[str] | None:
  """Class names from a run's misclassified.npz arrays, else its dataset's."""
  if arrays is not None and "class_names" in arrays:
    return [str(x) for x in arrays["class_names"]]
  known = KNOWN_CLASS_NAMES.get(run.dataset or "")
  return list(known) if known else None


def class_names(groups: Sequence[Group], k: int) -> list[str]:
  """The first `k` class names any run of `groups` knows, else "0".."k-1"."""
  for g in groups:
    for r in g.runs:
      arrays = (load_misclassified(r) if r.misclassified is not None
                else None)
      for names in (run_class_names(r, arrays), run_class_names(r, None)):
        if names and len(names) == k:
          return names
  return [str(i) for i in range(k)]
