"""The submitit launchers (jaxreg/launchers.py) and the cluster examples.

The local launcher runs for real (submitit's LocalExecutor: a controller and
a task process per array task), with one task sent submitit's preemption
signal mid-run; the SLURM path is checked up to the sbatch script submitit
hands to `sbatch` (a stand-in `sbatch` records it); examples/ are parsed and
their command lines run with --dry_run.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxreg import checkpoint, launchers, sweep
from tests import helpers

L1_L2 = "configs/l1_l2.py:smoke"
EXAMPLES = helpers.ROOT / "examples"
# Columns that measure time, not what was computed.
TIMING = {"train_time_s", "compile_time_s", "time_to_target_s"}


def _names(config: str = L1_L2, **kw) -> list[str]:
  return [r["variant"] for r in sweep.run(config, workdir="unused",
                                          dry_run=True, print_fn=lambda s: None,
                                          **kw)]


# --- Settings: refused before anything is submitted ---------------------------


def test_unknown_launcher_and_settings_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid choices: local, slurm"):
    launchers.check("pbs")
  with pytest.raises(ValueError, match=r"partiton \(did you mean partition\?"
                     r"\); valid: partition, gpus_per_task"):
    launchers.check("slurm", {"partiton": "gpu"})
  for bad, match in [({"gpus_per_task": -1}, "integer >= 0"),
                     ({"gpus_per_task": True}, "integer >= 0"),
                     ({"array_parallelism": 0}, "integer >= 1"),
                     ({"mem_gb": "16G"}, "number >= 0"),
                     ({"time": "1:3"}, r"\[D-\]HH:MM\[:SS\]"),
                     ({"time": 0}, ">= 1"),
                     ({"time": 2, "signal_delay_s": 120}, "under --slurm.time"),
                     ({"extra": {"time": "1:00:00"}}, "--slurm.time"),
                     ({"extra": {"qos": ["a"]}}, "string, number or true")]:
    with pytest.raises(ValueError, match=match):
      launchers.check("slurm", bad)
  s = launchers.check("local", {"time": "1-02:30", "extra": {"qos": "x"}})
  assert s.time_min == 24 * 60 + 150 and s.extra == {"qos": "x"}
  assert launchers.parse_time("90") == 90 == launchers.parse_time("1:30:00")


def test_bad_launcher_values_refused_by_the_command_before_submitting(
    tmp_path):
  work = tmp_path / "w"
  cases = [("--launcher=pbs", "should be one of <local|slurm>"),
           ("--slurm.partiton=gpu", "Valid --slurm settings: partition, "
            "gpus_per_task"),
           ("--slurm.time=soon", "minutes (90) or [D-]HH:MM[:SS]")]
  for flag, message in cases:
    launcher = [] if flag.startswith("--launcher") else ["--launcher=local"]
    out = helpers.run_launch(f"--config={L1_L2}", f"--workdir={work}", flag,
                             *launcher, timeout=120)
    assert out.returncode == 2, (flag, out.stderr[-2000:])
    assert message in out.stderr, (flag, out.stderr[-2000:])
  # Without --launcher the settings would be silently unused.
  out = helpers.run_launch(f"--config={L1_L2}", f"--workdir={work}",
                           "--slurm.partition=gpu", timeout=120)
  assert out.returncode == 2 and "needs --launcher" in out.stderr
  with pytest.raises(ValueError, match="valid choices: local, slurm"):
    sweep.run(L1_L2, workdir=work, launcher="pbs")
  with pytest.raises(ValueError, match="needs launcher='slurm'"):
    sweep.run(L1_L2, workdir=work, slurm={"partition": "gpu"})
  assert not work.exists()


# --- SLURM: the script submitit submits ---------------------------------------


def test_slurm_array_script_asks_for_the_settings_signal_and_requeue(
    tmp_path, monkeypatch):
  # Stand-ins: submitit needs an `srun` on PATH and reads sbatch's answer.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
  (bin_dir / "sbatch").write_text(
      '#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
      'echo "Submitted batch job 4242"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  work = tmp_path / "w"
  names = _names()
  settings = launchers.check("slurm", {
      "partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 8,
      "time": "1:30:00", "mem_gb": 16, "array_parallelism": 2,
      "extra": {"qos": "high", "exclusive": True}})
  run_shard = functools.partial(sweep.run, L1_L2, workdir=str(work),
                                side_by_side=False)
  jobs = launchers.submit_slurm(run_shard, names, work, settings,
                                job_name="l1_l2")
  assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]
  script = (bin_dir / "submitted.sh").read_text()
  sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
  # One array task per run, at most 2 at once.
  assert sbatch["array"] == "0-2%2"
  # USR2 120 s before the limit (submitit's preemption/timeout signal,
  # which SweepTask turns into a checkpoint before submitit requeues).
  assert sbatch["signal"] == f"{launchers.preemption_signal().name[3:]}@120"
  assert "requeue" in sbatch and sbatch["requeue"] == ""
  assert sbatch["partition"] == "gpu" and sbatch["gpus-per-task"] == "1"
  assert sbatch["cpus-per-task"] == "8" and sbatch["time"] == "90"
  assert sbatch["mem"] == "16GB" and sbatch["qos"] == "high"
  assert sbatch["exclusive"] == "" and sbatch["job-name"] == "l1_l2"
  assert sbatch["output"].startswith(str(work / launchers.DEFAULT_FOLDER))
  command = script.strip().splitlines()[-1]
  assert command.startswith("srun ") and "-m submitit.core._submit" in command
  # Each task's pickle: a checkpointable SweepTask for its one variant.
  from submitit import helpers as submitit_helpers
  for job, name in zip(jobs, names):
    task = submitit_helpers.DelayedSubmission.load(
        job.paths.submitted_pickle).function
    assert isinstance(task, launchers.SweepTask) and task.names == [name]
    assert task.checkpoint().function is task
  # array_size=2: the three runs round-robin into two tasks.
  assert launchers.shards(names, 2) == [[names[0], names[2]], [names[1]]]


# --- The preemption signal reaches jaxreg's stop request first ----------------


def test_preemption_signal_stops_the_run_before_submitit_requeues():
  calls = []
  sig = launchers.preemption_signal()

  def submitit_handler(signum, frame):  # Stands for submitit's.
    del frame
    calls.append(signum)

  previous = signal.signal(sig, submitit_handler)
  try:
    with launchers.Preemption() as preemption:
      with checkpoint.StopSignals() as stop:
        signal.raise_signal(sig)
        # Training: a stop request (checkpoint at the next step); submitit
        # not yet called.
        assert stop.requested(1) == signal.SIGTERM and not calls
        assert preemption.signum == sig
      preemption.requeue()  # What SweepTask does after Interrupted.
      assert calls == [sig]
    with launchers.Preemption():
      signal.raise_signal(sig)  # Not training: straight to submitit.
    assert calls == [sig, sig]
  finally:
    restored = signal.getsignal(sig)
    signal.signal(sig, previous)
  assert restored is submitit_handler and calls == [sig, sig]


# --- Local: a preempted task is requeued and resumes, same table --------------


def _table(path: Path) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in csv.DictReader(open(path))]


@pytest.mark.slow
def test_local_launcher_with_a_preempted_task_matches_in_process_sweep(
    tmp_path, mnist_manual_dir):
  del mnist_manual_dir
  over = ["--config.train.epochs=3"]  # A window to signal it mid-run.
  plain = tmp_path / "plain"
  rows = sweep.run(L1_L2, workdir=plain, overrides={"train.epochs": 3},
                   side_by_side=False, print_fn=lambda s: None)
  assert [r["status"] for r in rows] == ["completed"] * 3
  work = tmp_path / "launched"
  proc = subprocess.Popen(
      [sys.executable, "launch.py", f"--config={L1_L2}", *over,
       f"--workdir={work}", "--noreport", "--launcher=local",
       "--slurm.array_size=2"], cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  names = _names()
  first = work / names[0]  # Task 0's first run (task 0: runs 0 and 2).
  attempts = work / launchers.DEFAULT_FOLDER / "tasks" / "0.jsonl"
  # Its first epoch is done (and checkpointed); 2 to go.
  _wait_for_first_epoch(proc, first)
  pid = json.loads(attempts.read_text().splitlines()[-1])["pid"]
  os.kill(pid, launchers.preemption_signal())
  _, err = proc.communicate(timeout=400)
  assert proc.returncode == 0, err[-3000:]
  # Requeued by submitit: a second attempt of task 0, which resumed the run.
  tries = [json.loads(l) for l in attempts.read_text().splitlines()]
  assert len(tries) == 2 and tries[1]["pid"] != pid
  assert tries[0]["variants"] == [names[0], names[2]]
  summary = json.loads((first / "summary.json").read_text())
  assert summary["resumed_from_step"] > 0 and summary["sessions"] == 2
  logs = "".join(p.read_text() for p in
                 (work / launchers.DEFAULT_FOLDER).glob("*_log.*"))
  assert "Requeued job" in logs and "saving a checkpoint" in logs
  tasks1 = work / launchers.DEFAULT_FOLDER / "tasks" / "1.jsonl"
  assert len(tasks1.read_text().splitlines()) == 1
  # Resume is bit-exact on CPU: every column but the timings is equal.
  assert _table(work / "summary.csv") == _table(plain / "summary.csv")
  assert [r["status"] for r in _table(work / "summary.csv")] == [
      "completed"] * 3


def _wait_for_first_epoch(proc, run_dir: Path, timeout_s: float = 300):
  deadline = time.time() + timeout_s
  while time.time() < deadline and proc.poll() is None:
    m = run_dir / "metrics.jsonl"
    if m.exists() and m.read_text().count("\n") >= 1:
      return
    time.sleep(0.05)
  raise AssertionError(f"no first epoch in {run_dir}: "
                       f"{proc.stderr.read()[-3000:]}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
      f"/proc/{pid}/status").read_text().lower()


@pytest.mark.slow
def test_stopped_local_launcher_stops_its_tasks_and_a_relaunch_resumes(
    tmp_path, mnist_manual_dir):
  del mnist_manual_dir
  names = _names()
  args = [sys.executable, "launch.py", f"--config={L1_L2}",
          "--config.train.epochs=3", f"--variants={names[1]}",
          f"--workdir={tmp_path}", "--noreport", "--launcher=local"]
  proc = subprocess.Popen(args, cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  run_dir = tmp_path / names[1]
  _wait_for_first_epoch(proc, run_dir)
  attempts = tmp_path / launchers.DEFAULT_FOLDER / "tasks" / "0.jsonl"
  pid = json.loads(attempts.read_text().splitlines()[-1])["pid"]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=launchers.LOCAL_STOP_WAIT_S + 60)
  assert proc.returncode == 143, err[-3000:]
  assert not _alive(pid)  # The task stopped with its launcher.
  assert json.loads((run_dir / "summary.json").read_text())["status"] == (
      "running")
  assert "stopped by SIGTERM" in "".join(
      p.read_text() for p in (tmp_path / launchers.DEFAULT_FOLDER).glob(
          "*_log.*"))
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["resumed_from_step"] > 0


# --- examples/ ----------------------------------------------------------------


def _dry_run_shards(command: list[str], env_var: str, shards: int,
                    tmp_path: Path, extra_env: dict | None = None
                    ) -> list[list[str]]:
  """Each shard's variants, from the command run with --dry_run."""
  out = []
  for i in range(shards):
    proc = subprocess.run(
        [*command, "--dry_run"], cwd=helpers.ROOT, capture_output=True,
        text=True, timeout=120,
        env={**os.environ, env_var: str(i), **(extra_env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith("variants"), proc.stdout
    out.append([l.split("  ")[0] for l in lines[:-1]])
  assert not any(tmp_path.glob("w*/summary.csv"))  # A dry run writes none.
  return out


def test_slurm_array_example_runs_every_variant_once(tmp_path):
  path = EXAMPLES / "slurm_array.sbatch"
  text = path.read_text()
  sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?", text, re.M))
  first, last = map(int, sbatch["array"].split("-"))
  num_shards = int(re.search(r"--num_shards=(\d+)", text).group(1))
  assert first == 0 and last + 1 == num_shards
  assert sbatch["signal"] == "TERM@120" and "requeue" in sbatch
  assert sbatch["gpus-per-task"] == "1" and sbatch["time"] == "02:00:00"
  # The script itself, with `srun` running its command here.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
  (bin_dir / "srun").chmod(0o755)
  path_env = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                              os.environ["PATH"]])
  shards = _dry_run_shards(["bash", str(path)], "SLURM_ARRAY_TASK_ID",
                           num_shards, tmp_path,
                           {"PATH": path_env, "WORKDIR": str(tmp_path / "w")})
  assert sorted(sum(shards, [])) == sorted(_names("configs/l1_l2.py"))
  assert all(shards)


def test_k8s_indexed_job_example_runs_every_variant_once(tmp_path):
  job = yaml.safe_load((EXAMPLES / "k8s_indexed_job.yaml").read_text())
  assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed"
  pod = spec["template"]["spec"]
  assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it.
  assert pod["terminationGracePeriodSeconds"] >= 60  # Time to checkpoint.
  (container,) = pod["containers"]
  command = container["command"] + container.get("args", [])
  assert command[:2] == ["python", "launch.py"]
  num_shards = int(next(a for a in command if a.startswith("--num_shards="))
                   .split("=")[1])
  assert spec["completions"] == num_shards
  workdir = next(a for a in command if a.startswith("--workdir="))
  assert any(workdir.split("=")[1].startswith(m["mountPath"])
             for m in container["volumeMounts"])
  command = [sys.executable] + [
      f"--workdir={tmp_path / 'w'}" if a == workdir else a
      for a in command[1:]]
  shards = _dry_run_shards(command, "JOB_COMPLETION_INDEX", num_shards,
                           tmp_path)
  assert sorted(sum(shards, [])) == sorted(_names("configs/l1_l2.py"))
  assert all(shards)
