"""Several jobs on one workdir, as real processes: each variant trained by
one job at a time (proved from the lock log), a SIGKILLed job's variant
taken over and resumed bit-exactly, two identical launches training each
variant once, and side-by-side workers that die with their launcher."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxreg import locks
from tests import helpers
from tests.test_locks import alive, wait_dead

L1_L2 = "configs/l1_l2.py:smoke"  # 3 variants, 1024 images, 2 epochs.
VARIANTS = ("norm=batch,l1=0.0001,weight_decay=0.001",
            "norm=group,num_groups=2,l1=0.0001,weight_decay=0",
            "norm=layer,l1=0,weight_decay=0.001")
STEPS_PER_EPOCH = 1024 // 128
# Columns that measure time: they differ between any two runs.
TIMING = ("train_time_s", "compile_time_s", "time_to_target_s",
          "epoch_time_s", "eval_time_s", "images_per_s")

pytestmark = pytest.mark.slow


def _cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, "launch.py", f"--config={L1_L2}",
          f"--workdir={workdir}", "--noreport", *extra]


def _start(workdir: Path, *extra: str, env: dict | None = None):
  """launch.py on `workdir`, its output into a file beside it (not a pipe:
  workers inherit their launcher's output, and a pipe would stay open, and
  its reader waiting, as long as any of them lives)."""
  log = workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(_cmd(workdir, *extra), cwd=helpers.ROOT,
                            stdout=f, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
  proc.log = log
  return proc


def _finish(procs, timeout=300) -> list[tuple[int, str]]:
  """(exit status, the tail of the output) of each process."""
  return [(p.wait(timeout=timeout), p.log.read_text()[-3000:])
          for p in procs]


def _poll(condition, what: str, procs=(), timeout: float = 240):
  """Waits for `condition()` to hold, failing if a process of `procs` ends
  or `timeout` passes first."""
  deadline = time.monotonic() + timeout
  while not condition():
    for p in procs:
      assert p.poll() is None, f"ended before {what}: {p.log.read_text()}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _table(workdir: Path) -> dict[str, dict]:
  with open(workdir / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  names = [r["variant"] for r in rows]
  assert sorted(names) == sorted(VARIANTS), names  # Each once.
  return {r["variant"]: r for r in rows}


def _metrics(run_dir: Path) -> list[dict]:
  return [json.loads(l) for l in
          (run_dir / "metrics.jsonl").read_text().splitlines() if l]


def _untimed(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in TIMING}


def _assert_same_results(workdir: Path, reference: Path) -> None:
  """Every non-timing number of summary.csv and metrics.jsonl as in the
  sequential sweep: bit-exact (CPU, one device each, same programs)."""
  got, want = _table(workdir), _table(reference)
  for v in VARIANTS:
    assert got[v]["status"] == "completed", got[v]
    assert _untimed(got[v]) == _untimed(want[v]), v
    assert ([_untimed(r) for r in _metrics(workdir / v)] ==
            [_untimed(r) for r in _metrics(reference / v)]), v


def _holder(workdir: Path, name: str) -> int | None:
  """The pid that holds variant lock `name` now, from the lock log."""
  holder = None
  for r in locks.read_log(workdir):
    if r["lock"] == name:
      holder = r["pid"] if r["event"] == "acquired" else None
  return holder


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, mnist_manual_dir) -> Path:
  """The plain sweep, one job: the numbers every other layout must give."""
  workdir = tmp_path_factory.mktemp("sequential")
  [(code, out)] = _finish([_start(workdir)])
  assert code == 0, out
  return workdir


def test_three_jobs_one_killed_and_relaunched(tmp_path, sequential):
  procs = [_start(tmp_path, "--num_shards=1") for _ in range(3)]
  try:
    # Kill the holder of a variant once its first epoch is checkpointed
    # (orbax renames checkpoints/<step> into place when it is complete).
    def checkpointed():
      for v in VARIANTS:
        if ((tmp_path / v / "checkpoints" / str(STEPS_PER_EPOCH)).is_dir()
            and _holder(tmp_path, v) is not None):
          return v
      return None
    _poll(checkpointed, "a checkpointed epoch", procs)
    victim_variant = checkpointed()
    victim = _holder(tmp_path, victim_variant)
    by_pid = {p.pid: p for p in procs}
    assert victim in by_pid
    by_pid[victim].send_signal(signal.SIGKILL)
    by_pid[victim].wait(timeout=60)
    survivors = [p for p in procs if p.pid != victim]
    procs.append(_start(tmp_path, "--num_shards=1"))  # The relaunch.
    results = _finish(survivors + procs[-1:])
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert [code for code, _ in results] == [0, 0, 0], results
  _assert_same_results(tmp_path, sequential)
  log = locks.read_log(tmp_path)
  assert locks.overlaps(log) == []
  # The killed job's lock was recovered, and its run resumed from the
  # checkpoint (not retrained): two sessions, each epoch once.
  recovered = [r for r in log if r["event"] == "acquired" and r["recovered"]]
  assert [(r["lock"], r["recovered"]["pid"]) for r in recovered] == [
      (victim_variant, victim)]
  summary = json.loads((tmp_path / victim_variant / "summary.json"
                        ).read_text())
  assert summary["sessions"] == 2
  assert summary["resumed_from_step"] == STEPS_PER_EPOCH
  for v in VARIANTS:
    assert [r["epoch"] for r in _metrics(tmp_path / v)] == [1, 2]


def test_two_identical_launches_train_each_variant_once(tmp_path, sequential):
  first = _start(tmp_path)
  try:
    metrics = tmp_path / VARIANTS[0] / "metrics.jsonl"
    _poll(lambda: metrics.exists() and metrics.read_text().strip(),
          "the first job's first epoch", [first])
    second = _start(tmp_path)
    results = _finish([first, second])
  finally:
    first.kill()
    first.wait()
  assert [code for code, _ in results] == [0, 0], results
  _assert_same_results(tmp_path, sequential)
  log = locks.read_log(tmp_path)
  assert locks.overlaps(log) == []
  assert not any(r.get("recovered") for r in log)
  for v in VARIANTS:
    summary = json.loads((tmp_path / v / "summary.json").read_text())
    assert summary["sessions"] == 1, v  # Trained by one job, once.
    assert [r["epoch"] for r in _metrics(tmp_path / v)] == [1, 2]
  # The second found the first's variant held and went on with the others.
  assert "held by another job" in results[1][1]


def _workers_of(launcher: int, workdir: Path) -> list[int]:
  """Pids of the side-by-side workers `launcher` started (their spec files
  are named after it)."""
  marker = f"--spec={workdir}/.worker-{launcher}-".encode()
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
      except OSError:
        continue
      if marker in cmdline:
        pids.append(int(entry))
  return pids


def test_killed_launcher_takes_its_side_by_side_workers_along(
    tmp_path, mnist_manual_dir):
  launcher = _start(tmp_path, env={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  try:
    # Both workers started and each took a variant's lock.
    def training():
      pids = [p for p in _workers_of(launcher.pid, tmp_path) if alive(p)]
      holders = {_holder(tmp_path, v) for v in VARIANTS}
      return pids if len(pids) == 2 and set(pids) <= holders else None
    _poll(training, "two workers training", [launcher])
    worker_pids = training()
    killed = time.monotonic()
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=60)
    assert wait_dead(worker_pids, 10), [p for p in worker_pids if alive(p)]
    print(f"workers gone {time.monotonic() - killed:.1f} s after the kill")
  finally:
    launcher.kill()
    launcher.wait()
    for p in _workers_of(launcher.pid, tmp_path):
      os.kill(p, signal.SIGKILL)
  assert locks.overlaps(locks.read_log(tmp_path)) == []
