"""Side-by-side workers: a sweep's variants in parallel on one machine.

One worker process per group of `devices_per_run` local devices, each
seeing only its own devices (CUDA_VISIBLE_DEVICES on GPUs; a simulated host
device count on CPUs, for tests), runs its round-robin share of the
variants as `python -m jaxreg.sweep --spec=<spec.json>`. A signal to the
sweep reaches every worker, which checkpoints and stops.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import ml_collections
from absl import logging

from jaxreg import results


def plan_workers(devices_per_run: int, num_variants: int) -> list[dict]:
  """Device groups for worker processes; [] means run in this process."""
  if num_variants < 2:
    return []
  import jax
  devices = jax.local_devices()
  per_run = devices_per_run or 1
  n_workers = min(len(devices) // per_run, num_variants)
  if n_workers < 2:
    return []
  backend = jax.default_backend()
  groups = []
  for w in range(n_workers):
    ids = [d.id for d in devices[w * per_run:(w + 1) * per_run]]
    env = {}
    if backend == "gpu":
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    elif backend == "cpu":
      # Simulated host devices (tests): give each worker its own count.
      flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
      env["XLA_FLAGS"] = (
          f"{flags} --xla_force_host_platform_device_count={per_run}").strip()
    else:
      raise ValueError(
          f"side-by-side variants are supported on GPU (and simulated CPU "
          f"devices), not on {backend}; use --devices_per_run={len(devices)} "
          "to run each variant over all devices")
    groups.append({"env": env, "devices": ids, "num_devices": per_run})
  return groups


def run_workers(workers: list[dict], path: str | None,
                 base: ml_collections.ConfigDict, overrides: dict | None,
                 sweep: Sequence[dict] | None, todo: Sequence[Any],
                 workdir: Path, *, stack: bool = False,
                 stack_mode: str = "auto", seeds: int = 1) -> list[int]:
  """Runs `todo` round-robin in one worker process per device group;
  returns the workers' exit codes (exit_status of each worker's share)."""
  procs: list[subprocess.Popen] = []
  with _ForwardStop(procs) as stop:
    for w, group in enumerate(workers):
      if stop.signum is not None:
        break
      mine = [v.name for v in todo[w::len(workers)]]
      spec = {"config_path": path, "config": None if path else base.to_dict(),
              "overrides": overrides or {},
              "sweep": list(sweep) if sweep else None,
              "variants": mine, "workdir": str(workdir),
              "devices_per_run": group["num_devices"],
              "stack": stack, "stack_mode": stack_mode, "seeds": seeds}
      spec_path = workdir / f".worker-{w}.json"
      results.write_json(spec_path, spec)
      logging.info("worker %d on devices %s: %d variants", w,
                   group["devices"], len(mine))
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "jaxreg.sweep", f"--spec={spec_path}"],
          env={**os.environ, **group["env"]}))
    codes = [p.wait() for p in procs]
  if stop.signum is not None:
    # Each worker checkpointed its run and stopped; so does the sweep.
    raise SystemExit(128 + stop.signum)
  if any(codes):
    logging.warning("worker exit codes %s (failed variants are in "
                    "summary.csv)", codes)
  return codes


class _ForwardStop:
  """While the workers run, SIGTERM or SIGINT here reaches them as SIGTERM.

  Each worker then checkpoints its run at the current step and exits, and
  none outlives the sweep to race a relaunch. (A terminal's Ctrl-C also
  reaches the workers directly; a worker treats SIGINT + SIGTERM as one
  request.) The previous handlers come back on exit.
  """

  def __init__(self, procs: list[subprocess.Popen]):
    self.procs = procs
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _ForwardStop:
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      logging.warning("%s received: asking the workers to checkpoint and "
                      "stop", signal.Signals(signum).name)
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)


