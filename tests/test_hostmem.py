"""jaxreg.hostmem: a compiled step's scratch memory is reused, not remapped.

Each case runs in a fresh Python process, since both settings are
process-wide and JAX's dispatch mode is fixed when its CPU backend starts.
"""
import json
import os
import subprocess
import sys

import pytest

from jaxreg import hostmem
from jaxreg import results

# A jitted function whose 64 MB intermediate (sin(x), the dot's input) is
# XLA's per-execution scratch buffer; prints the minor page faults of the
# median call (while glibc's heap is still growing, some calls fault).
_PROBE = r"""
import json, os, resource
import jax, jax.numpy as jnp
from jaxreg import hostmem
from jaxreg import results
if os.environ.get("START_BACKEND_FIRST") == "1":
  jnp.zeros(1).block_until_ready()
state = hostmem.tune()
x = jnp.ones((4096, 4096), jnp.float32)
w = jnp.ones((4096, 8), jnp.float32)
f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum()).lower(x, w).compile()
temp = f.memory_analysis().temp_size_in_bytes
for _ in range(3):
  f(x, w).block_until_ready()
faults = []
for _ in range(15):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
faults = sorted(faults)[len(faults) // 2]  # The median call's.
print(json.dumps({"state": state, "faults": faults, "temp": temp}))
"""


def _probe(**env) -> dict:
  out = subprocess.run(
      [sys.executable, "-c", _PROBE], capture_output=True, text=True,
      timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(
    hostmem.glibc() is None,
    reason="the malloc settings are glibc's (Linux)")


@needs_glibc
def test_tuned_process_reuses_scratch_memory_and_untuned_remaps_it():
  tuned = _probe(**{hostmem.ENV_VAR: "1"})
  plain = _probe(**{hostmem.ENV_VAR: "0"})
  assert tuned["temp"] >= 64 << 20  # Above glibc's largest default threshold.
  assert tuned["state"]["cpu_async_dispatch"] is False
  assert "mmap_threshold=1073741824" in tuned["state"]["malloc"]
  assert plain["state"] == {"enabled": False, "cpu_async_dispatch": True,
                            "malloc": "default (JAXREG_HOST_TUNING=0)"}
  # 64 MB is 16,384 pages: mapped afresh each call unless reused.
  assert tuned["faults"] < 1000, tuned
  assert plain["faults"] > 10 * max(tuned["faults"], 100), (tuned, plain)


@needs_glibc
def test_backend_started_first_keeps_async_dispatch_and_says_so():
  late = _probe(**{hostmem.ENV_VAR: "1", "START_BACKEND_FIRST": "1"})
  assert late["state"]["cpu_async_dispatch"] is True
  assert "call jaxreg.hostmem.tune() before the first JAX computation" in (
      late["state"]["note"])
  # The malloc part still applies, but the worker thread's arena cannot
  # hold 64 MB: the buffer is still mapped afresh (why dispatch matters).
  assert "mmap_threshold" in late["state"]["malloc"]
  assert late["faults"] > 4000, late


@pytest.mark.parametrize("value,expected", [
    ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("yes", True), ("", True)])
def test_enabled_reads_the_environment(monkeypatch, value, expected):
  monkeypatch.setenv(hostmem.ENV_VAR, value)
  assert hostmem.enabled() is expected


def test_tune_in_this_process_was_applied_by_conftest():
  # tests/conftest.py calls tune() before any test starts the backend, as
  # launch.py does; the record is what env.json gets.
  state = hostmem.tune()
  if hostmem.enabled():
    assert state["cpu_async_dispatch"] is False
    assert "note" not in state
  else:
    assert state["cpu_async_dispatch"] is True
    assert state["malloc"].startswith("default")
  # Each run's env.json records it.
  assert results.environment()["host_tuning"] == state
