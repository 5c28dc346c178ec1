"""How a bench script hands its numbers to the process that started it.

A bench that times each loop in a fresh process (resnet_epoch.py,
mnist_epoch.py, conv_layers.py) and bench/ab.py, which runs a whole bench
on two trees, read one line `RESULT <json>` from the child's stdout. This
module imports no JAX, so ab.py's parent stays light.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Mapping, Sequence

PREFIX = "RESULT "


def print_result(obj: Any) -> None:
  """Prints `obj` as the line `run_script` reads back."""
  print(PREFIX + json.dumps(obj), flush=True)


def run_script(argv: Sequence[str], what: str, *,
               env: Mapping[str, str] | None = None,
               cwd: str | None = None) -> Any:
  """Runs `python argv...` in a fresh process and returns the JSON of the
  last `RESULT` line it printed.

  Raises:
    RuntimeError: naming `what`, with the tails of its output, if it exits
      non-zero or prints no result.
  """
  out = subprocess.run([sys.executable, *argv], cwd=cwd, env=env,
                       capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith(PREFIX)]
  if out.returncode or not lines:
    raise RuntimeError(f"{what} failed (rc {out.returncode}):\n"
                       f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len(PREFIX):])
