"""One run over several JAX processes (`--distributed`), for real.

Two local processes with one CPU device each form a 2-device mesh over
127.0.0.1 (gloo collectives) and train configs/mnist.py:smoke, shrunk to
1024 training images in batches of 64 (16 steps per epoch, 2 epochs). The
reference is one process with 2 host devices on the same global batch.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxreg import locks
from jaxreg import results
from tests.helpers import ROOT

SMALL = {"dataset.train_size": 1024, "dataset.test_size": 500,
         "train.batch_size": 64, "train.epochs": 2}
STEPS_PER_EPOCH = 16
ROW_KEYS = ("epoch", "step", "lr", "train_loss", "train_accuracy",
            "test_loss", "test_accuracy", "test_micro_f1", "test_macro_f1")
SUMMARY_KEYS = ("status", "epochs_completed", "train_loss", "train_accuracy",
                "test_loss", "test_accuracy", "test_macro_f1",
                "test_confusion", "num_devices")
# Variables by which jax could take this machine for a cluster node.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "JAX_",
                     "TPU_")
# Survivors must stop within this long after a peer dies (issue 17).
STOP_BOUND_S = 60


def _env(**extra: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(_CLUSTER_PREFIXES) and k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(ROOT)
  return {**env, **extra}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cli(workdir: Path, *flags: str) -> list[str]:
  return [sys.executable, "launch.py", "--config=configs/mnist.py:smoke",
          "--report=false", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in SMALL.items()], *flags]


def _umask(mask: int):
  return lambda: os.umask(mask)


# Process 0 creates files 0644 and process 1 0600: a file's mode says
# which process created it.
UMASKS = (0o022, 0o077)


def _start(workdir: Path, logs: Path, *flags: str, workdirs=None
           ) -> list[subprocess.Popen]:
  """Both processes of a 2-process run, each logging to logs/p<i>.log."""
  port = _free_port()
  logs.mkdir(parents=True, exist_ok=True)
  procs = []
  for i in range(2):
    with open(logs / f"p{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          _cli((workdirs or [workdir] * 2)[i], "--distributed", *flags),
          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
          preexec_fn=_umask(UMASKS[i]),
          env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))))
  return procs


def _wait_all(procs, logs: Path, timeout: float = 300) -> list[int]:
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.monotonic()))
            for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail(f"still running after {timeout}s:\n{_tails(logs)}")
  finally:
    _kill(procs)


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def _tails(logs: Path) -> str:
  return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                   for p in sorted(logs.glob("p*.log")))


def _rows(run_dir: Path) -> list[list]:
  return [[r[k] for k in ROW_KEYS]
          for r in results.read_jsonl(run_dir / "metrics.jsonl")]


def _ckpt_steps(run_dir: Path) -> list[int]:
  d = run_dir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) \
      if d.is_dir() else []


def _assert_same_numbers(run_dir: Path, ref_dir: Path) -> None:
  # Bound: 0, equality. Measured: every metric bit-identical between 2
  # processes x 1 device and 1 process x 2 devices (and after a resume).
  # Why it can be exact: both run the same SPMD program per device on the
  # same global batch, and with 2 devices each cross-device reduction
  # (gradients, BatchNorm statistics, loss sums) adds exactly two partial
  # values, which IEEE-754 rounds the same in either order; gloo's
  # all-reduce order cannot matter. (With more processes it could, at
  # float32 rounding level.)
  assert _rows(run_dir) == _rows(ref_dir)
  summary = results.read_json(run_dir / "summary.json")
  ref = results.read_json(ref_dir / "summary.json")
  assert {k: summary[k] for k in SUMMARY_KEYS} == \
         {k: ref[k] for k in SUMMARY_KEYS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_manual_dir):
  """One process with 2 host devices: the run directory."""
  run_dir = tmp_path_factory.mktemp("one_process")
  out = subprocess.run(
      _cli(run_dir), cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert results.read_json(run_dir / "summary.json")["num_devices"] == 2
  return run_dir


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices_and_write_once(
    tmp_path, reference):
  run_dir, logs = tmp_path / "run", tmp_path / "logs"
  codes = _wait_all(_start(run_dir, logs), logs)
  assert codes == [0, 0], _tails(logs)
  _assert_same_numbers(run_dir, reference)
  env = results.read_json(run_dir / "env.json")
  assert (env["process_count"], env["device_count"]) == (2, 2)

  # Files written once: the reference's files, one events file, one row
  # per epoch and per logged step.
  # `.locks` is the one-process run's lock (sweep.py); a run over several
  # processes takes none.
  names = lambda d: sorted(
      "events" if p.name.startswith("events.") else p.name
      for p in d.iterdir() if p.name != locks.LOCK_DIR)
  assert names(run_dir) == names(reference)
  assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
  assert [r["epoch"] for r in results.read_jsonl(
      run_dir / "metrics.jsonl")] == [1, 2]
  steps = [r["step"] for r in results.read_jsonl(run_dir / "steps.jsonl")]
  assert steps == sorted(set(steps))
  # Process 1 created nothing but its own shards of the checkpoints
  # (orbax's multi-process save: each process writes its part).
  from_p1 = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                   if not p.stat().st_mode & 0o044)
  assert from_p1, "process 1 wrote no checkpoint shard: is it in the run?"
  assert all(p.startswith("checkpoints/") and "process_1" in p
             for p in from_p1), from_p1
  assert run_dir.stat().st_mode & 0o044  # Process 0 made it.
  text = (logs / "p1.log").read_text()
  assert "jax.distributed: process 1 of 2, 1 of 2 devices local" in text


@pytest.mark.slow
# Process 1, not the coordinator: its death is the one a survivor must
# notice through a failed collective (the coordinator's takes the whole
# service down with it, measured 0.4-0.8 s). Both were run while building
# this; one case keeps the suite inside its time budget.
@pytest.mark.parametrize("victim", [1])
def test_a_killed_process_stops_the_other_and_a_relaunch_resumes(
    tmp_path, reference, victim):
  run_dir, logs = tmp_path / "run", tmp_path / "logs"
  flags = ("--config.train.log_every_s=1e-6",)  # A line after every step.
  procs = _start(run_dir, logs, *flags)
  survivor = procs[1 - victim]
  try:
    deadline = time.monotonic() + 300
    # Inside epoch 2, with epoch 1's checkpoint committed.
    while not (STEPS_PER_EPOCH in _ckpt_steps(run_dir) and
               f"epoch 2/2: step 2/{STEPS_PER_EPOCH}" in
               (logs / f"p{victim}.log").read_text()):
      assert all(p.poll() is None for p in procs), _tails(logs)
      assert time.monotonic() < deadline, _tails(logs)
      time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
      code = survivor.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running {STOP_BOUND_S}s "
                  f"after process {victim} was killed:\n{_tails(logs)}")
    stopped_s = time.monotonic() - killed
  finally:
    _kill(procs)
  text = (logs / f"p{1 - victim}.log").read_text()
  assert code != 0, text[-3000:]
  # jaxreg's error (the collective failed) or JAX's coordination service
  # ending the process, whichever comes first.
  assert ("another process of this run died" in text or
          "This most likely indicates that another task died" in text), \
      text[-3000:]
  print(f"process {1 - victim} exited {code} {stopped_s:.1f}s after the kill")
  assert results.read_json(run_dir / "summary.json")["status"] in (
      "running", "failed")
  assert _ckpt_steps(run_dir) == [STEPS_PER_EPOCH]

  logs2 = tmp_path / "relaunch"
  codes = _wait_all(_start(run_dir, logs2, *flags), logs2)
  assert codes == [0, 0], _tails(logs2)
  summary = results.read_json(run_dir / "summary.json")
  assert summary["resumed_from_step"] == STEPS_PER_EPOCH
  assert summary["sessions"] == 2
  _assert_same_numbers(run_dir, reference)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(
    tmp_path, reference):
  # checkpoint.StopSignals with several processes: JAX's preemption sync
  # point, not a signal handler, makes every process stop at the same step.
  run_dir, logs = tmp_path / "run", tmp_path / "logs"
  flags = ("--config.train.log_every_s=1e-6",
           "--config.checkpoint.every_epochs=0")
  procs = _start(run_dir, logs, *flags)
  try:
    deadline = time.monotonic() + 300
    while f"epoch 1/2: step 1/{STEPS_PER_EPOCH}" not in (
        logs / "p0.log").read_text():
      assert all(p.poll() is None for p in procs), _tails(logs)
      assert time.monotonic() < deadline, _tails(logs)
      time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=STOP_BOUND_S) for p in procs]
  finally:
    _kill(procs)
  assert codes == [128 + signal.SIGTERM] * 2, _tails(logs)
  (step,) = _ckpt_steps(run_dir)
  # The processes agree on the stop step through JAX's coordination
  # service, some steps after the signal (step 8-9 when sent at step 3 on a
  # loaded machine, 16 in a clean-clone run): any step before the end of
  # training, the same for both.
  assert 1 <= step < 2 * STEPS_PER_EPOCH, step
  for i in range(2):
    assert f"stopped by SIGTERM at step {step}" in (
        logs / f"p{i}.log").read_text()

  logs2 = tmp_path / "relaunch"
  codes = _wait_all(_start(run_dir, logs2, *flags), logs2)
  assert codes == [0, 0], _tails(logs2)
  summary = results.read_json(run_dir / "summary.json")
  assert summary["resumed_from_step"] == step
  _assert_same_numbers(run_dir, reference)


@pytest.mark.slow
def test_processes_on_different_run_directories_are_refused(tmp_path,
                                                           mnist_manual_dir):
  logs = tmp_path / "logs"
  dirs = [tmp_path / "a", tmp_path / "b"]
  codes = _wait_all(_start(dirs[0], logs, workdirs=dirs), logs, timeout=120)
  assert all(c != 0 for c in codes), _tails(logs)
  for i in range(2):
    text = (logs / f"p{i}.log").read_text()
    assert "disagree on the run directory" in text, text[-3000:]
    assert f"process 0: {dirs[0]}" in text and f"process 1: {dirs[1]}" in text
  assert not (dirs[0] / "summary.json").exists()


@pytest.mark.parametrize("extra, message", [
    ({}, "JAX_COORDINATOR_ADDRESS=<host of process 0>:<port>"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "one"}, "$JAX_PROCESS_ID='one' is not an integer"),
])
def test_distributed_without_a_cluster_says_what_to_set(extra, message):
  code = "from jaxreg import runtime; runtime.setup(distributed=True)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=_env(**extra))
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-3000:]


def test_the_processes_come_from_a_slurm_environment(tmp_path):
  # What `srun --ntasks=2` sets, on one node; jax 0.10.2 derives the
  # coordinator (first node of SLURM_STEP_NODELIST), the process count and
  # id from it (JAX_COORDINATOR_PORT only picks a free port).
  port = _free_port()
  code = ("from jaxreg import runtime; runtime.setup(distributed=True); "
          "import jax; print('processes', jax.process_index(), "
          "jax.process_count(), jax.device_count(), flush=True)")
  procs = [subprocess.Popen(
      [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=_env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1",
               SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
               SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_PORT=str(port)))
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    _kill(procs)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"processes {i} 2 2" in out, out[-3000:]
