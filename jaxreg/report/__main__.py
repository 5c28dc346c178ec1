"""`python -m jaxreg.report <workdir> [--out report.md]` (see cli.py)."""
import sys

from jaxreg.report.cli import main

sys.exit(main())
