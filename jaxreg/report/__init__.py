"""Markdown report with tables and figures for a sweep or a single run.

    python -m jaxreg.report <workdir> [--out report.md]

reads the files a run or sweep leaves behind (layout in results.py and
sweep.py) and writes `<workdir>/report.md` with PNG figures under
`<workdir>/figures/`. It only reads files, so it works on a sweep that is
still running or partly failed: a variant that failed, diverged or lacks
files is listed with its status and error and left out of means, plots and
the choice of the best variant; it never stops the report.

Variants that differ only in the `seed` axis are repeats of one setting: the
report groups them and shows mean ± sample std (ddof=1) over the completed
seeds. Each group keeps one colour in every figure.

The package, bottom-up (each module imports only those above it):
  loading   reading run and sweep directories into Run / Study
  grouping  seed groups (Group), their colours, the best group
  tables    the summary and per-run tables as markdown
  figures/  one module per figure, shared plotting helpers (common), and
            the registry the report loops over
  markdown  build_report: the document
  cli       the command line
"""
from jaxreg.report.cli import main
from jaxreg.report.figures import (REGISTRY, plot_confusion, plot_curves,
                                   plot_features, plot_heatmaps,
                                   plot_misclassified)
from jaxreg.report.grouping import (SEED_AXIS, Group, best_group, group_runs,
                                    ranking_key)
from jaxreg.report.loading import Run, Study, load_run, load_study
from jaxreg.report.markdown import build_report
from jaxreg.report.tables import render_table, run_rows, summary_rows

__all__ = [
    "REGISTRY", "SEED_AXIS", "Group", "Run", "Study", "best_group",
    "build_report", "group_runs", "load_run", "load_study", "main",
    "plot_confusion", "plot_curves", "plot_features", "plot_heatmaps",
    "plot_misclassified", "ranking_key", "render_table", "run_rows",
    "summary_rows",
]
