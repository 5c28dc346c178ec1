"""Forest plot: each setting's difference to the baseline, with its 95%
intervals (Welch t and bootstrap), one panel per compared metric."""
from __future__ import annotations

from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxreg.report import comparison
from jaxreg.report import stats
from jaxreg.report.figures import common
from jaxreg.report.figures.registry import Context, Drawn, FigureSpec

# Panels, in order, when the analysis has them (the censored metrics have
# no difference of means to draw).
PANELS = ("test_accuracy", "val_accuracy", "test_loss", "test_macro_f1",
          "epochs_to_target")
VERDICT_MARKERS = {stats.BETTER: "^", stats.WORSE: "v", stats.SAME: "o"}


def _panels(ctx: Context) -> list[str]:
  a = ctx.analysis
  if a is None or a.baseline is None:
    return []
  return [k for k in PANELS if any(
      c.diff == c.diff for c in a.comparisons.get(k, {}).values())]


def plot_forest(ctx: Context, path: Path) -> tuple[Path | None, str]:
  """Draws the forest plot; returns (path, caption detail)."""
  a = ctx.analysis
  keys = _panels(ctx)
  if not keys:
    return None, ""
  others = [g for g in a.groups if g.label in a.baseline_of]
  height = 1.2 + 0.45 * len(others)
  fig = Figure(figsize=(5.2 * len(keys), height + 1.2), layout="constrained")
  axs = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
  for ax, key in zip(axs, keys):
    metric = stats.METRICS_BY_KEY[key]
    s = metric.scale
    for y, g in enumerate(reversed(others)):
      c = a.comparisons[key].get(g.label)
      if c is None or c.diff != c.diff:
        continue
      if c.boot_lo == c.boot_lo:
        ax.plot([c.boot_lo * s, c.boot_hi * s], [y - 0.12] * 2,
                color=g.color, lw=1.2, alpha=0.6)
      if c.lo == c.lo:
        ax.plot([c.lo * s, c.hi * s], [y] * 2, color=g.color, lw=3)
      ax.plot([c.diff * s], [y], marker=VERDICT_MARKERS.get(c.verdict, "s"),
              color=g.color, ms=8, mec="black", zorder=3)
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.set_ylim(-0.6, len(others) - 0.4)  # Room for the outer markers.
    unit = " (pp)" if s == 100 else ""
    ax.set_xlabel(f"Δ {metric.label.split(' (')[0]}{unit}: setting - "
                  "baseline")
    better = "right" if metric.higher_is_better else "left"
    ax.set_title(f"{metric.label.split(' (')[0]} (better to the {better})")
    ax.grid(True, axis="x", alpha=0.3)
    # A few ticks: small differences (losses) have long tick labels.
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
  axs[0].set_yticks(range(len(others)),
                    [g.label for g in reversed(others)], fontsize=8)
  axs[0].set_ylabel("setting")
  handles = [Line2D([], [], color="grey", lw=3),
             Line2D([], [], color="grey", lw=1.2, alpha=0.6)]
  labels = ["Welch t 95% CI", "bootstrap 95% CI"]
  for verdict, marker in VERDICT_MARKERS.items():
    handles.append(Line2D([], [], ls="", marker=marker, color="grey",
                          mec="black", ms=7))
    labels.append(f"mean Δ, {verdict} (Holm, 5%)")
  fig.suptitle(f"{ctx.title}: difference to the baseline "
               f"{comparison.baseline_words(a)}", fontsize=12)
  common.legend_below(fig, handles, labels)
  return common.save(fig, path), ", ".join(keys)


def _draw(ctx: Context, item) -> Drawn | None:
  del item
  path, detail = plot_forest(ctx, ctx.fig_dir / "forest.png")
  return Drawn("Differences to the baseline", path, detail) if path else None


def _caption(ctx: Context, drawn: Drawn) -> str:
  return (f"Mean difference of each setting to the baseline "
          f"({comparison.baseline_words(ctx.analysis)}) over seeds, per "
          "metric "
          f"({drawn.detail}): thick bar = Welch t 95% interval, thin bar = "
          "percentile bootstrap 95% interval, marker = verdict of the "
          "Holm-corrected Welch test. Accuracy differences in percentage "
          "points.")


FIGURE = FigureSpec(
    name="forest",
    applies=lambda ctx, item: bool(_panels(ctx)),
    draw=_draw,
    caption=_caption)
