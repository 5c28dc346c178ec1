"""What a figure is to the report: a name, when it applies, how to draw it
and what its caption says.

Each figure module defines one `FigureSpec` (its `FIGURE`); figures/__init__
lists them once, in report order, as `REGISTRY`; markdown.build_report loops
over it. A figure that raises becomes a note in the report, never a failed
report.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxreg.report.grouping import SEED_AXIS, Group
from jaxreg.report.loading import Study


@dataclasses.dataclass
class Context:
  """What every figure may draw from: the study, its groups, the best one."""
  study: Study
  groups: list[Group]
  best: Group | None
  fig_dir: Path
  # comparison.Analysis of a seeded study (estimates, tests), else None.
  analysis: Any = None

  @property
  def title(self) -> str:
    return self.study.name

  @property
  def seeded(self) -> bool:
    return SEED_AXIS in self.study.axes


@dataclasses.dataclass(frozen=True)
class Drawn:
  """One drawn figure: its section heading, its file, and what its caption
  needs from the drawing (`detail`) or from the item it was drawn for."""
  heading: str
  path: Path
  detail: str = ""
  item: Any = None


def drawn_once(heading: str, file_name: str,
               plot: Callable[[Context, Path], Any]
               ) -> Callable[[Context, Any], Drawn | None]:
  """A `FigureSpec.draw` for a figure drawn once, into
  `figures/<file_name>`, by `plot(ctx, path)`; `plot` returns the path, or
  (path, detail for the caption), with None for the path when there was
  nothing to draw."""

  def draw(ctx: Context, item: Any) -> Drawn | None:
    del item
    out = plot(ctx, ctx.fig_dir / file_name)
    path, detail = out if isinstance(out, tuple) else (out, "")
    return Drawn(heading, path, detail) if path else None

  return draw


def _once(ctx: Context) -> Sequence[Any]:
  del ctx
  return (None,)


@dataclasses.dataclass(frozen=True)
class FigureSpec:
  """One kind of figure.

  For each item of `items(ctx)` (by default a single None; the heatmaps: one
  per declared pair of axes) for which `applies(ctx, item)`, the report calls
  `draw(ctx, item)`; a Drawn result becomes a section captioned
  `caption(ctx, drawn)`, None (nothing to show after all) is skipped.
  """
  name: str
  applies: Callable[[Context, Any], bool]
  draw: Callable[[Context, Any], Drawn | None]
  caption: Callable[[Context, Drawn], str]
  items: Callable[[Context], Sequence[Any]] = _once
