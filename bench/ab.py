"""Before/after: one benchmark run alternately on two versions of jaxreg.

  git archive main | tar -x -C /tmp/before        # the version to compare
  python bench/ab.py --before=/tmp/before --rounds=3 -- \
      bench/step_variants.py --rounds=2 --steps=4

Copies this checkout's bench/ into the --before tree (so both run the same
benchmark code over their own jaxreg), then runs the benchmark script in
each tree in turn, `--rounds` times, each in a fresh process with that tree
first on the path. The script prints its numbers as one line
`RESULT {"name": seconds, ...}` (step_variants.py, resnet_epoch.py and
mnist_epoch.py do); printed: each name's median before and after and the
median of per-round after/before ratios, with the 1-minute load average.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
from pathlib import Path

from absl import app
from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import childproc  # pylint: disable=g-import-not-at-top,wrong-import-position

_BEFORE = flags.DEFINE_string("before", None, "Root of the other version.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")


def _run(tree: Path, argv: list[str]) -> dict[str, float]:
  return childproc.run_script(argv, f"{argv} in {tree}", cwd=str(tree),
                              env={**os.environ, "PYTHONPATH": str(tree)})


def main(argv):
  script = argv[1:]
  if not script or not _BEFORE.value:
    raise app.UsageError("give --before=DIR and, after --, a bench script "
                         "with its flags")
  before = Path(_BEFORE.value).resolve()
  shutil.copytree(ROOT / "bench", before / "bench", dirs_exist_ok=True)
  trees = {"before": before, "after": ROOT}
  res = {k: [] for k in trees}
  for r in range(_ROUNDS.value):
    for k, tree in trees.items():
      res[k].append(_run(tree, script))
      print(f"round {r + 1} {k}: {res[k][-1]} (load "
            f"{os.getloadavg()[0]:.2f})", flush=True)
  print(f"\n{' '.join(script)}: {_ROUNDS.value} rounds, load "
        f"{os.getloadavg()[0]:.2f}")
  print("| name | before | after | after / before (median of rounds) |")
  print("|---|---|---|---|")
  for name in res["before"][0]:
    b = [x[name] for x in res["before"]]
    a = [x[name] for x in res["after"]]
    ratio = statistics.median(y / x for x, y in zip(b, a))
    print(f"| {name} | {statistics.median(b):.4g} | {statistics.median(a):.4g}"
          f" | {ratio:.3f} |")


if __name__ == "__main__":
  app.run(main)
