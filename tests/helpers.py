"""Shared test utilities."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launch(*args: str, env: dict | None = None, timeout: int = 300):
  """Runs launch.py in a subprocess, as a user would."""
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})
