"""The report's figures, one module each, and their registry.

REGISTRY lists every figure once, in the order the report shows them. A new
figure is a module defining `FIGURE = registry.FigureSpec(...)` (see
registry.py) plus one line here.
"""
from __future__ import annotations

from jaxreg.report.figures import confusion
from jaxreg.report.figures import curves
from jaxreg.report.figures import features
from jaxreg.report.figures import forest
from jaxreg.report.figures import heatmaps
from jaxreg.report.figures import misclassified
from jaxreg.report.figures.registry import Context, Drawn, FigureSpec

REGISTRY: tuple[FigureSpec, ...] = (
    curves.FIGURE,
    forest.FIGURE,
    heatmaps.FIGURE,
    features.FIGURE,
    confusion.FIGURE,
    misclassified.FIGURE,
)
if len({f.name for f in REGISTRY}) != len(REGISTRY):
  raise ValueError(f"figure names repeat: {[f.name for f in REGISTRY]}")

plot_curves = curves.plot_curves
plot_heatmaps = heatmaps.plot_heatmaps
plot_features = features.plot_features
plot_confusion = confusion.plot_confusion
plot_misclassified = misclassified.plot_misclassified

__all__ = ["REGISTRY", "Context", "Drawn", "FigureSpec", "plot_confusion",
           "plot_curves", "plot_features", "plot_heatmaps",
           "plot_misclassified"]
