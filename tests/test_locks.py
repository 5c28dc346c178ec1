"""Variant locks held by real processes (held, skipped, recovered after a
SIGKILL), their names and log; the side-by-side workers' environments
(GPU layouts, computed without a GPU); workers tied to their launcher."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxreg import locks
from jaxreg import sweep
from jaxreg import workers
from tests import helpers

# A process holding the locks named in argv[2:] of workdir argv[1] until
# killed; it says so on stdout once it holds them.
_HOLD = ("import sys, time; from jaxreg import locks; "
         "held = [locks.FileLock(sys.argv[1], n) for n in sys.argv[2:]]; "
         "assert all(l.acquire(blocking=False) for l in held); "
         "print('held', flush=True); time.sleep(120)")


@contextlib.contextmanager
def _holder(workdir, *names):
  child = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir), *names],
                           stdout=subprocess.PIPE, text=True, cwd=helpers.ROOT)
  try:
    assert child.stdout.readline().strip() == "held"
    yield child
  finally:
    child.kill()
    child.wait()


def alive(pid: int) -> bool:
  """Whether process `pid` still runs (a zombie, dead but not yet reaped by
  its parent, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rpartition(")")[2].split()[0]
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return False
  return state not in ("Z", "X")


def wait_dead(pids, timeout: float) -> bool:
  """Polls until none of `pids` runs; False if one still does at `timeout`."""
  deadline = time.monotonic() + timeout
  while any(alive(p) for p in pids):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def test_safe_names_are_files_and_distinct():
  plain = "norm=group,num_groups=2,l1=0.0001,weight_decay=0"
  assert locks.safe_name(plain) == plain  # Readable where it can be.
  names = ["norm=batch/seed=0", "norm=batch/seed=1", "norm=batch_seed=0",
           ".hidden", "x" * 400, "x" * 399 + "y", "a b", "a_b"]
  safe = [locks.safe_name(n) for n in names]
  assert len(set(safe)) == len(names)
  for s in safe:
    assert "/" not in s and not s.startswith(".") and len(s) <= 200
  assert safe[0].startswith("norm=batch_seed=0.")


def test_held_lock_is_skipped_then_recovered_after_holder_is_killed(
    tmp_path):
  with _holder(tmp_path, "norm=b/seed=0") as child:
    assert not locks.FileLock(tmp_path, "norm=b/seed=0").acquire(
        blocking=False)
    held = []
    turns = locks.each_locked(tmp_path, ["a", "norm=b/seed=0", "c"],
                              lambda n: [n], on_held=held.append)
    # The free ones first, the held one deferred; nothing waits meanwhile.
    assert [next(turns), next(turns)] == ["a", "c"]
    assert held == ["norm=b/seed=0"]
    child.send_signal(signal.SIGKILL)
    child.wait()
    # Then waited for: the kernel dropped the dead holder's flock.
    assert next(turns) == "norm=b/seed=0"
    with pytest.raises(StopIteration):
      next(turns)
  log = locks.read_log(tmp_path)
  assert [(r["lock"], r["event"], r["pid"]) for r in log] == [
      ("norm=b/seed=0", "acquired", child.pid),
      ("a", "acquired", os.getpid()), ("a", "released", os.getpid()),
      ("c", "acquired", os.getpid()), ("c", "released", os.getpid()),
      ("norm=b/seed=0", "acquired", os.getpid()),
      ("norm=b/seed=0", "released", os.getpid())]
  # The newcomer names whose lock it recovered; a free lock names none.
  assert log[5]["recovered"] == {"host": log[0]["host"], "pid": child.pid}
  assert log[1]["recovered"] is None
  assert locks.overlaps(log) == []


def test_group_locks_are_all_or_none(tmp_path):
  with _holder(tmp_path, "b"):
    assert locks.lock_all(tmp_path, ["c", "b", "a"], blocking=False) is None
    # None kept: "a" and "c" are free for anyone (here, another handle).
    for n in ("a", "c"):
      lock = locks.FileLock(tmp_path, n)
      assert lock.acquire(blocking=False)
      lock.release()
  held = locks.lock_all(tmp_path, ["c", "b", "a"], blocking=False)
  assert [h.name for h in held] == ["a", "b", "c"]  # Sorted: no deadlock.
  locks.release_all(held)
  assert not any(h.held for h in held)


def test_overlaps_finds_a_lock_held_twice():
  def rec(event, pid, recovered=None):
    return {"lock": "v", "event": event, "host": "h", "pid": pid,
            "recovered": recovered}
  clean = [rec("acquired", 1), rec("released", 1), rec("acquired", 2),
           # 2 was killed; 3 recovered its lock.
           rec("acquired", 3, {"host": "h", "pid": 2}), rec("released", 3)]
  assert locks.overlaps(clean) == []
  twice = [rec("acquired", 1), rec("acquired", 2), rec("released", 2)]
  assert locks.overlaps(twice) == ["v: ('h', 2) acquired it while h, 1 held it"]
  assert len(locks.overlaps([rec("released", 4)])) == 1


def test_worker_env_splits_or_shares_gpus():
  one = workers.worker_groups("gpu", [0, 1, 2, 3], 1, 10)
  assert [g["env"] for g in one] == [{"CUDA_VISIBLE_DEVICES": str(i)}
                                     for i in range(4)]
  # Two GPUs per run; at most one worker per variant.
  two = workers.worker_groups("gpu", [0, 1, 2, 3, 4], 2, 10)
  assert [g["env"]["CUDA_VISIBLE_DEVICES"] for g in two] == ["0,1", "2,3"]
  assert [g["num_devices"] for g in two] == [2, 2]
  assert len(workers.worker_groups("gpu", [0, 1, 2, 3], 1, 3)) == 3
  assert workers.worker_groups("gpu", [0, 1, 2, 3], 1, 1) == []
  assert workers.worker_groups("gpu", [0], 1, 5) == []
  # Three workers on each of two GPUs: no preallocation, 0.9/3 each.
  shared = workers.worker_groups("gpu", [0, 1], 1, 10, workers_per_device=3)
  assert [g["env"]["CUDA_VISIBLE_DEVICES"] for g in shared] == [
      "0", "0", "0", "1", "1", "1"]
  assert shared[0]["env"] == {"CUDA_VISIBLE_DEVICES": "0",
                              "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                              "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}
  # One GPU shared by two: side by side where one worker each could not be.
  assert len(workers.worker_groups("gpu", [0], 1, 5,
                                   workers_per_device=2)) == 2


def test_worker_env_on_cpu_and_refusals():
  env = workers.worker_env(
      "cpu", [0, 1], xla_flags="--xla_cpu_x=1 "
      "--xla_force_host_platform_device_count=8")
  assert env == {"XLA_FLAGS": "--xla_cpu_x=1 "
                              "--xla_force_host_platform_device_count=2"}
  assert workers.worker_env("cpu", [3]) == {
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  with pytest.raises(ValueError, match="not on tpu"):
    workers.worker_env("tpu", [0])
  with pytest.raises(ValueError, match="workers_per_device=0 must be >= 1"):
    workers.worker_env("gpu", [0], workers_per_device=0)
  # Refused by the sweep before anything (a dry run imports no JAX).
  with pytest.raises(ValueError, match="workers_per_device=0 must be >= 1"):
    sweep.run("configs/l1_l2.py:smoke", workdir="/nonexistent",
              dry_run=True, workers_per_device=0, print_fn=lambda s: None)


def test_cli_refuses_bad_workers_per_device():
  out = helpers.run_launch("--config=configs/l1_l2.py:smoke", "--dry_run",
                           "--workers_per_device=0", timeout=120)
  assert out.returncode == 2
  assert "workers_per_device=0 must be >= 1" in out.stderr


_ORPHAN = """
import os, subprocess, sys, time
# The launcher's pid as the spec gives it (getppid() in the child would name
# a new parent if this one were already dead), or "1": not its parent.
code, parent, deaf = sys.argv[1:]
child = subprocess.Popen([sys.executable, "-c", code,
                          parent if parent != "0" else str(os.getpid()), deaf])
print(child.pid, flush=True)
time.sleep(120)
"""
_CHILD = ("import os, signal, sys, time; from jaxreg import workers; "
          "sys.argv[2] == '1' and signal.signal(signal.SIGTERM, "
          "signal.SIG_IGN); "
          "workers.die_with_parent(int(sys.argv[1]), "
          "grace_s=1.0, poll_s=0.05); time.sleep(120)")


@pytest.mark.parametrize("watch_only,deaf", [(False, False), (True, False),
                                              (False, True)])
def test_worker_dies_with_its_launcher(watch_only, deaf):
  """PR_SET_PDEATHSIG; the parent watch alone, for a launcher already gone
  when the worker starts (here: a parent id that is not its own); and a
  worker that does not stop on SIGTERM, killed after its grace period."""
  parent = subprocess.Popen(
      [sys.executable, "-c", _ORPHAN, _CHILD, "1" if watch_only else "0",
       "1" if deaf else "0"],
      stdout=subprocess.PIPE, text=True, cwd=helpers.ROOT,
      env={**os.environ, "PYTHONPATH": str(helpers.ROOT)})
  try:
    child = int(parent.stdout.readline())
    if not watch_only:
      assert not wait_dead([child], 1.0)  # It lives while its parent does.
      parent.kill()
    if deaf:  # SIGTERM ignored: alive until the grace period (1 s) ends.
      assert not wait_dead([child], 0.5)
    assert wait_dead([child], 10), "the worker outlived its launcher"
  finally:
    parent.kill()
    parent.wait()
