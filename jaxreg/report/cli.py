"""`python -m jaxreg.report <workdir> [--out report.md]`."""
from __future__ import annotations

import argparse
from typing import Sequence

from jaxreg.report.markdown import build_report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxreg.report",
      description="Write report.md with tables and figures for a sweep or "
                  "run directory.")
  parser.add_argument("workdir", help="sweep or run directory")
  parser.add_argument("--out", default=None,
                      help="markdown file (default <workdir>/report.md)")
  args = parser.parse_args(argv)
  try:
    path = build_report(args.workdir, args.out)
  except ValueError as e:
    parser.error(str(e))
  print(path)
  return 0
