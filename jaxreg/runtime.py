"""Process set-up, once, before JAX starts a backend: `setup()`.

It applies jaxreg's host settings (hostmem.py), turns on the persistent
XLA compilation cache (a re-run or a sweep variant skips recompiling) and,
when asked, joins a multi-process run with `jax.distributed.initialize()`.
The CLI (jaxreg/cli.py, launch.py) calls it first thing; the Python entry
points (sweep.run, train.train_and_evaluate) call it too, which is a no-op
the second time. Nothing else in jaxreg changes process-wide settings.

One run over several processes (`setup(distributed=True)`, `--distributed`):
every process runs the same command; together they form one global mesh.
Where the processes find each other comes from the cluster environment
that jax 0.10.2 detects itself (SLURM, Open MPI, Kubernetes, Cloud TPU),
else from JAX_COORDINATOR_ADDRESS (host:port of process 0, read by jax)
and JAX_NUM_PROCESSES / JAX_PROCESS_ID (read here: jax 0.10.2 reads only
the address). CPU processes exchange collectives over gloo (TCP).

A dead process: the survivors' next collective fails at once ("Gloo
all-reduce failed ... Connection reset by peer"; train.py records and
raises it as `ProcessLost`), and JAX's coordination service, which misses
the dead process's heartbeats after HEARTBEAT_TIMEOUT_S (or loses its
connection to process 0), terminates any process still waiting, also at
exit ("Terminating process because the JAX distributed service detected
fatal errors"), so no process hangs: measured, the survivor is gone 0.4 s
(process 0 killed) to 6.4 s (process 1 killed) after a SIGKILL
(tests/test_distributed.py). Relaunching all of them resumes from the last
checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import threading

import jax
import numpy as np
from absl import logging

from jaxreg import hostmem

CACHE_ENV_VAR = "JAXREG_COMPILATION_CACHE"
# Programs faster to compile than this are not worth a cache entry.
CACHE_MIN_COMPILE_S = 0.5
# jaxreg's names for what jax 0.10.2 does not read from the environment.
NUM_PROCESSES_ENV_VAR = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV_VAR = "JAX_PROCESS_ID"
COORDINATOR_ENV_VAR = "JAX_COORDINATOR_ADDRESS"  # Read by jax itself.
# A process that sent no heartbeat for this long is dead, and the others
# are stopped (jax's default, 100 s, lets survivors wait that long at exit).
# Heartbeats come from a background thread, so a long compile or
# checkpoint does not miss them. $JAXREG_HEARTBEAT_TIMEOUT_S overrides it.
HEARTBEAT_TIMEOUT_S = 10
HEARTBEAT_ENV_VAR = "JAXREG_HEARTBEAT_TIMEOUT_S"
# Longest string `agree` compares.
_AGREE_BYTES = 4096
# What a collective's error says when a peer process died (gloo on CPU,
# NCCL on GPU) or the coordination service lost it.
LOST_PEER_MARKERS = ("Gloo", "NCCL", "Connection reset by peer",
                     "Connection closed by peer", "heartbeat",
                     "coordination service", "Barrier")


class ProcessLost(RuntimeError):
  """A collective of a multi-process run failed: another process most
  likely died. Relaunching every process resumes from the last checkpoint."""


_lock = threading.Lock()
_done: dict | None = None


def default_cache_dir() -> str:
  """$JAXREG_COMPILATION_CACHE, else ~/.cache/jaxreg/xla."""
  return os.environ.get(CACHE_ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxreg", "xla")


def setup(*, distributed: bool = False,
          compilation_cache: str | None = None) -> dict:
  """Applies the process settings once; returns what was set.

  Args:
    distributed: call `jax.distributed.initialize()` (its arguments come
      from the cluster environment or JAX_COORDINATOR_ADDRESS /
      JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    compilation_cache: cache directory (default: `default_cache_dir()`).

  Returns:
    {"host_tuning": hostmem.tune()'s record, "compilation_cache": path,
    "distributed": bool}.
  """
  global _done
  with _lock:
    if _done is not None:
      if distributed and not _done["distributed"]:
        logging.warning("runtime.setup(distributed=True) after a setup "
                        "without it: jax.distributed was not initialised")
      return dict(_done)
    host = hostmem.tune()  # Before anything starts JAX's CPU backend.
    path = compilation_cache or default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      CACHE_MIN_COMPILE_S)
    if distributed:
      initialize_distributed()
    _done = {"host_tuning": host, "compilation_cache": path,
             "distributed": bool(distributed)}
    return dict(_done)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer") from None


def initialize_distributed(heartbeat_timeout_s: int | None = None) -> None:
  """`jax.distributed.initialize()` from the environment (module docstring),
  with gloo collectives on CPU; a clear error when nothing says where the
  other processes are. `heartbeat_timeout_s` defaults to
  $JAXREG_HEARTBEAT_TIMEOUT_S, else HEARTBEAT_TIMEOUT_S."""
  # Before initialize: the CPU client is built with its collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  num = _env_int(NUM_PROCESSES_ENV_VAR)
  pid = _env_int(PROCESS_ID_ENV_VAR)
  if heartbeat_timeout_s is None:
    heartbeat_timeout_s = _env_int(HEARTBEAT_ENV_VAR) or HEARTBEAT_TIMEOUT_S
  try:
    jax.distributed.initialize(
        num_processes=num, process_id=pid,
        heartbeat_timeout_seconds=heartbeat_timeout_s)
  except ValueError as e:
    raise ValueError(
        f"--distributed: {e} No cluster environment that jax detects "
        "(SLURM, Open MPI, Kubernetes, Cloud TPU) was found; set "
        f"{COORDINATOR_ENV_VAR}=<host of process 0>:<port>, "
        f"{NUM_PROCESSES_ENV_VAR}=N and {PROCESS_ID_ENV_VAR}=i (0 <= i < N) "
        "for every process") from e
  logging.info("jax.distributed: process %d of %d, %d of %d devices local",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def agree(what: str, value: str) -> None:
  """Raises ValueError unless every JAX process passes the same `value`
  (e.g. a run directory); a no-op in a single process. A collective: every
  process must call it, in the same order."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  raw = value.encode()
  if len(raw) > _AGREE_BYTES:
    raw = hashlib.sha256(raw).hexdigest().encode()
  buf = np.zeros(_AGREE_BYTES, np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  values = [bytes(r).rstrip(b"\0").decode(errors="replace")
            for r in rows]
  if len(set(values)) > 1:
    listed = "; ".join(f"process {i}: {v}" for i, v in enumerate(values))
    raise ValueError(
        f"the {len(values)} processes of this run disagree on {what} "
        f"({listed}); launch every process with the same command, "
        "working directory and filesystem")


def process_lost(error: BaseException) -> ProcessLost | None:
  """`error` as a ProcessLost when it is a multi-process run's collective
  failing (LOST_PEER_MARKERS), else None."""
  if jax.process_count() == 1 or not isinstance(error, Exception):
    return None
  text = str(error)
  if not any(m in text for m in LOST_PEER_MARKERS):
    return None
  first = text.strip().splitlines()[0] if text.strip() else ""
  return ProcessLost(
      f"process {jax.process_index()} of {jax.process_count()}: a collective "
      f"failed, most likely because another process of this run died "
      f"({type(error).__name__}: {first[:300]}); relaunch every process with "
      "the same command to resume from the last checkpoint")
