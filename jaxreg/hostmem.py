"""Process settings that make XLA:CPU training steps about 2x faster.

What they fix (measured with `perf` on the S3 step, bench/README.md): every
execution of a compiled step asks the C allocator for one scratch buffer
holding all of its intermediates (84 MB for S3 at batch 128). glibc serves
requests above its mmap threshold (at most 32 MB by default) with a fresh
`mmap` and returns them with `munmap`, so each step touched 21,000 new
pages: 17,000 page faults per step, 18% of the process's CPU time in the
kernel, and a step of 70 ms instead of 38 ms.

`tune()` makes the allocator keep such buffers:

  * glibc `mallopt(M_MMAP_THRESHOLD, 1 GiB)` and `mallopt(M_TRIM_THRESHOLD,
    1 GiB)`: blocks up to 1 GiB come from the heap, and freed memory stays
    in it for the next step (the process keeps up to 1 GiB it no longer
    uses; a training process reuses it every step).
  * `jax_cpu_enable_async_dispatch=False`: single-device CPU computations
    run on the calling thread. Asynchronously dispatched ones run on a
    worker thread whose glibc arena cannot hold a block over 64 MB (its
    heaps are 64 MB), so the threshold alone does not help them. This must
    be set before JAX creates its CPU backend: `runtime.setup()` calls
    `tune()` first thing (the CLI, `sweep.run` and
    `train.train_and_evaluate` call setup), which works if the script has
    not run a JAX computation yet. Computations over several devices are
    dispatched asynchronously either way.

Neither setting changes a computed number. Set `JAXREG_HOST_TUNING=0` in the
environment to leave both alone (e.g. to compare; bench/mnist_epoch.py does).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

import jax
from absl import logging

ENV_VAR = "JAXREG_HOST_TUNING"
# mallopt takes a C int, so at most 2**31 - 1.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_FLAG = "jax_cpu_enable_async_dispatch"

_lock = threading.Lock()
_state: dict | None = None


def enabled() -> bool:
  """False when the environment variable JAXREG_HOST_TUNING is 0/false/no."""
  return os.environ.get(ENV_VAR, "1").strip().lower() not in (
      "0", "false", "no", "off")


def glibc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  return libc if hasattr(libc, "mallopt") else None


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started()) if started is not None else True


def _async_dispatch() -> bool:
  return bool(jax.config.values.get(_FLAG, True))


def state() -> dict | None:
  """What `tune()` applied in this process, or None before it ran."""
  return None if _state is None else dict(_state)


def tune() -> dict:
  """Applies the settings above once per process; returns what holds.

  The result (also written to each run's env.json) has `malloc` (the
  thresholds set, or why not), `cpu_async_dispatch` (JAX's flag as it is
  now) and `note` when something could not be applied.
  """
  global _state
  with _lock:
    if _state is not None:
      return dict(_state)
    state: dict = {"enabled": enabled()}
    if not state["enabled"]:
      state["malloc"] = f"default ({ENV_VAR}=0)"
    else:
      libc = glibc()
      if libc is None:
        state["malloc"] = "default (not glibc)"
      elif (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1):
        state["malloc"] = (f"glibc mmap_threshold={MMAP_THRESHOLD} "
                           f"trim_threshold={TRIM_THRESHOLD}")
      else:
        state["malloc"] = "default (mallopt refused)"
      if _async_dispatch():
        if _backend_started():
          state["note"] = (
              "JAX's CPU backend was started before jaxreg.hostmem.tune(), "
              "so steps on a CPU stay asynchronously dispatched and their "
              "scratch memory is mapped afresh every step (about 2x slower "
              "on small CPU models); call jaxreg.hostmem.tune() before the "
              "first JAX computation (launch.py does)")
        else:
          jax.config.update(_FLAG, False)
    state["cpu_async_dispatch"] = _async_dispatch()
    _state = state
  if "note" in state and jax.default_backend() == "cpu":
    logging.warning("%s", state["note"])
  return dict(state)
