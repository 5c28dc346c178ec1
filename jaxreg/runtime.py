"""Process set-up, once, before JAX starts a backend: `setup()`.

It applies jaxreg's host settings (hostmem.py), turns on the persistent
XLA compilation cache (a re-run or a sweep variant skips recompiling) and,
when asked, joins a multi-process run with `jax.distributed.initialize()`.
The CLI (jaxreg/cli.py, launch.py) calls it first thing; the Python entry
points (sweep.run, train.train_and_evaluate) call it too, which is a no-op
the second time. Nothing else in jaxreg changes process-wide settings.
"""
from __future__ import annotations

import os
import threading

import jax
from absl import logging

from jaxreg import hostmem

CACHE_ENV_VAR = "JAXREG_COMPILATION_CACHE"
# Programs faster to compile than this are not worth a cache entry.
CACHE_MIN_COMPILE_S = 0.5

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
      jax.distributed.initialize()
    _done = {"host_tuning": host, "compilation_cache": path,
             "distributed": bool(distributed)}
    return dict(_done)
