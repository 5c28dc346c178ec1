"""Side-by-side workers: a sweep's variants in parallel on one machine.

One worker process per group of `devices_per_run` local devices (or
`workers_per_device` processes sharing each group), each seeing only its own
devices (`worker_env`), runs its round-robin share of the variants as
`python -m jaxreg.sweep --spec=<workdir>/.worker-<launcher pid>-<w>.json`.
A signal to the launcher reaches every worker, which checkpoints and stops;
a launcher killed outright (SIGKILL) takes its workers with it
(`die_with_parent`), so none trains on as an orphan racing a relaunch.
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

# Of a GPU shared by N workers, each may use this fraction / N of its memory
# (the rest: the CUDA context of each process, and fragmentation).
SHARED_MEMORY_FRACTION = 0.9
_HOST_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def worker_env(backend: str, device_ids: Sequence[int], *,
               workers_per_device: int = 1, xla_flags: str = "") -> dict:
  """The environment variables of one worker on `device_ids` (pure).

  Args:
    backend: "gpu" or "cpu" (the launcher's jax.default_backend()).
    device_ids: the local device ids this worker sees.
    workers_per_device: how many workers share these devices. 1: the worker
      has them alone and JAX's default preallocation stands. N > 1: each
      preallocates nothing and may take SHARED_MEMORY_FRACTION / N of the
      memory, so the N fit side by side.
    xla_flags: the launcher's XLA_FLAGS (CPU: its simulated host device
      count is replaced by this worker's).

  Raises:
    ValueError: another backend (TPU: one process owns all its chips).
  """
  if workers_per_device < 1:
    raise ValueError(f"workers_per_device={workers_per_device} must be >= 1")
  if backend == "gpu":
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in device_ids)}
    if workers_per_device > 1:
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = (
          f"{SHARED_MEMORY_FRACTION / workers_per_device:.3f}")
    return env
  if backend == "cpu":
    # Simulated host devices (tests): each worker gets its own count.
    flags = _HOST_COUNT.sub("", xla_flags).strip()
    return {"XLA_FLAGS": (f"{flags} --xla_force_host_platform_device_count="
                          f"{len(device_ids)}").strip()}
  raise ValueError(
      f"side-by-side variants are supported on GPU (and simulated CPU "
      f"devices), not on {backend}; use --devices_per_run=<all devices> to "
      "run each variant over all devices")


def worker_groups(backend: str, device_ids: Sequence[int],
                  devices_per_run: int, num_variants: int, *,
                  workers_per_device: int = 1, xla_flags: str = ""
                  ) -> list[dict]:
  """The workers for `num_variants` variants on the devices `device_ids`
  (pure): [] means run in this process (fewer than two workers possible).
  Each is {"env", "devices", "num_devices"}."""
  if num_variants < 2:
    return []
  per_run = devices_per_run or 1
  groups = [list(device_ids[g * per_run:(g + 1) * per_run])
            for g in range(len(device_ids) // per_run)]
  slots = [g for g in groups for _ in range(workers_per_device)]
  slots = slots[:num_variants]
  if len(slots) < 2:
    return []
  return [{"env": worker_env(backend, ids,
                             workers_per_device=workers_per_device,
                             xla_flags=xla_flags),
           "devices": ids, "num_devices": per_run} for ids in slots]


def plan_workers(devices_per_run: int, num_variants: int,
                 workers_per_device: int = 1) -> list[dict]:
  """worker_groups over this process's local devices."""
  if num_variants < 2:
    return []
  import jax
  if jax.process_count() > 1:
    # One run over several processes: its processes train the sweep in
    # lockstep; workers of one process would not be part of that run.
    return []
  return worker_groups(jax.default_backend(),
                       [d.id for d in jax.local_devices()], devices_per_run,
                       num_variants, workers_per_device=workers_per_device,
                       xla_flags=os.environ.get("XLA_FLAGS", ""))


def spec_path(workdir: Path, w: int, launcher_pid: int | None = None) -> Path:
  """Worker `w`'s spec: per launcher, so two launches into one workdir do
  not overwrite each other's."""
  return workdir / f".worker-{launcher_pid or os.getpid()}-{w}.json"


def run_workers(workers: list[dict], path: str | None,
                base: ml_collections.ConfigDict, overrides: dict | None,
                sweep: Sequence[dict] | None, todo: Sequence[Any],
                workdir: Path, *, stack: bool = False,
                stack_mode: str = "auto", seeds: int = 1) -> list[int]:
  """Runs `todo` round-robin in one worker process per device group;
  returns the workers' exit codes (exit_status of each worker's share)."""
  procs: list[subprocess.Popen] = []
  specs = []
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
              "stack": stack, "stack_mode": stack_mode, "seeds": seeds,
              "launcher_pid": os.getpid()}
      specs.append(spec_path(workdir, w))
      results.write_json(specs[-1], spec)
      logging.info("worker %d on devices %s: %d variants", w,
                   group["devices"], len(mine))
      # Popen from this thread, which waits for them below: PDEATHSIG fires
      # when the thread that started a worker ends, not only the process.
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "jaxreg.sweep", f"--spec={specs[-1]}"],
          env={**os.environ, **group["env"]}))
    codes = [p.wait() for p in procs]
  for s in specs:
    s.unlink(missing_ok=True)
  if stop.signum is not None:
    # Each worker checkpointed its run and stopped; so does the sweep.
    raise SystemExit(128 + stop.signum)
  if any(codes):
    logging.warning("worker exit codes %s (failed variants are in "
                    "summary.csv)", codes)
  return codes


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM, *,
                    grace_s: float = 5.0, poll_s: float = 1.0) -> None:
  """Makes this process end soon after `parent_pid` (its launcher) dies,
  even by SIGKILL, so no worker trains on as an orphan racing a relaunch.

  It first gets `signum`: SIGTERM, on which a worker saves a checkpoint at
  its next step and stops (between runs it just ends). Linux's
  PR_SET_PDEATHSIG sends it at once; a thread watching the parent id covers
  a launcher that died before this call, and systems without prctl. A
  worker still alive `grace_s` later (loading data or compiling, where no
  step polls the request) is killed outright: it loses only work since its
  last checkpoint, which the next job to take the variant redoes.
  """
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) != 0:
      logging.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); the "
                      "parent watch alone stops this worker",
                      ctypes.get_errno())

  def watch() -> None:
    # Reparented (to init or a subreaper) once the launcher is gone.
    while os.getppid() == parent_pid:
      threading.Event().wait(poll_s)
    logging.warning("launcher %d is gone: stopping (at most %.0f s)",
                    parent_pid, grace_s)
    os.kill(os.getpid(), signum)
    threading.Event().wait(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def worker_args(spec_path_: str) -> dict:
  """sweep.run's arguments from a worker's spec, with this process tied to
  its launcher first (die_with_parent)."""
  spec = results.read_json(spec_path_)
  if spec.get("launcher_pid"):
    die_with_parent(spec["launcher_pid"])
  config = spec["config_path"]
  if config is None:
    config = ml_collections.ConfigDict(spec["config"])
  return dict(config=config, workdir=spec["workdir"],
              overrides=spec["overrides"], sweep=spec["sweep"],
              variants=spec["variants"],
              devices_per_run=spec["devices_per_run"], side_by_side=False,
              stack=spec.get("stack", False),
              stack_mode=spec.get("stack_mode", "auto"),
              seeds=spec.get("seeds", 1))


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


