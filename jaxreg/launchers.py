"""Cluster launchers: a sweep's runs as submitit jobs, on SLURM or locally.

`sweep.run(..., launcher="slurm", slurm={...})` (CLI: `--launcher=slurm
--slurm.partition=gpu ...`) does not train in this process: it splits the
runs it would train into array tasks, submits them with submitit
(`SlurmExecutor.submit_array`: one `sbatch --array`; `LocalExecutor`: one
local process per task, for tests and a workstation), waits for all of them,
and the sweep rebuilds summary.csv from the run directories. Every task runs
the same sweep function in-process for its own variants into the same
workdir, so run directories, resume and summary.csv are those of an
in-process sweep.

Tasks: one per run (variant x seed) by default; `array_size=N` splits the
runs round-robin into N tasks instead (each trains its share in order, and
`stack` groups within it). Each task appends one line per attempt (pid,
host, job id, variants) to `<folder>/tasks/<index>.jsonl`.

Preemption and time limits (submitit's Checkpointable protocol): the sbatch
script asks SLURM for `--signal=USR2@<signal_delay_s>` (USR2 before the time
limit, and at a preemption where the cluster sets
SlurmctldParameters=preempt_send_user_signal) and `--requeue`. submitit's
handler for that signal calls the task's `checkpoint()` and requeues the
job; here the task first turns the signal into jaxreg's stop request (the
SIGTERM path of checkpoint.StopSignals: finish the step, save a checkpoint,
raise checkpoint.Interrupted), and only then hands over to submitit's
handler, which requeues (local: the task exits 144 and its controller
starts it again; SLURM: `scontrol requeue`). The requeued task resumes from
that checkpoint. A plain SIGTERM (scancel, or SLURM's own preemption
without the user signal) still checkpoints and stops the run (exit 143)
without a requeue by submitit: a cancel stays a cancel, and SLURM requeues
a `--requeue` job it preempts itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import logging

LAUNCHERS = ("local", "slurm")
# Subfolder of the workdir for submitit's pickles, scripts and logs.
DEFAULT_FOLDER = "submitit"
# How often the local launcher looks at its running tasks.
LOCAL_POLL_S = 0.5
# A stopped local launcher waits this long for its tasks to checkpoint.
LOCAL_STOP_WAIT_S = 120


@dataclasses.dataclass(frozen=True)
class Settings:
  """`--slurm.*`: what the array tasks ask for.

  Only `time`, `signal_delay_s`, `array_size`, `array_parallelism`,
  `gpus_per_task` and `folder` apply to the local launcher.
  """
  partition: str = ""  # "": the cluster's default partition.
  gpus_per_task: int = 0  # 0: none requested.
  cpus_per_task: int = 0  # 0: the cluster's default.
  time: Any = 60  # Minutes, or "[D-]HH:MM[:SS]"; the task's time limit.
  mem_gb: float = 0  # 0: the cluster's default.
  array_size: int = 0  # Tasks: 0 = one per run; N = runs split into N.
  array_parallelism: int = 256  # At most this many tasks at once.
  signal_delay_s: int = 120  # USR2 this long before the time limit.
  folder: str = ""  # submitit's files; "" = <workdir>/submitit.
  extra: dict = dataclasses.field(default_factory=dict)  # More #SBATCH.

  @property
  def time_min(self) -> int:
    return parse_time(self.time)


SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))
_INTS = ("gpus_per_task", "cpus_per_task", "array_size", "signal_delay_s")


def parse_time(value: Any) -> int:
  """SLURM's --time as whole minutes: 90, "90", "1:30:00", "2-00:00"."""
  if isinstance(value, bool):
    raise ValueError(f"--slurm.time={value!r}: minutes or [D-]HH:MM[:SS]")
  if isinstance(value, (int, float)) or str(value).isdigit():
    minutes = float(value)
  else:
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", str(value))
    if not m:
      raise ValueError(f"--slurm.time={value!r}: minutes (90) or "
                       "[D-]HH:MM[:SS] (1:30:00, 2-00:00)")
    d, h, mi, s = (int(x or 0) for x in m.groups())
    minutes = d * 1440 + h * 60 + mi + s / 60
  if minutes < 1 or minutes != int(minutes):
    raise ValueError(f"--slurm.time={value!r}: a whole number of minutes "
                     ">= 1")
  return int(minutes)


def check(launcher: str | None, slurm: dict | None = None) -> Settings:
  """The launcher and its settings checked, before anything is submitted.

  Raises:
    ValueError: an unknown launcher or setting (listing the valid ones), or
      a value of the wrong type or range.
  """
  if launcher not in LAUNCHERS:
    raise ValueError(f"launcher={launcher!r}; valid choices: "
                     f"{', '.join(LAUNCHERS)}")
  given = dict(slurm or {})
  unknown = sorted(set(given) - set(SETTINGS))
  if unknown:
    hints = [f"{k} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(
        k, SETTINGS, n=1)) else k for k in unknown]
    raise ValueError(f"unknown --slurm setting(s) {', '.join(hints)}; valid: "
                     f"{', '.join(SETTINGS)}")
  for k in _INTS:
    if k in given and (isinstance(given[k], bool)
                       or not isinstance(given[k], int) or given[k] < 0):
      raise ValueError(f"--slurm.{k}={given[k]!r} must be an integer >= 0")
  if "array_parallelism" in given and (
      not isinstance(given["array_parallelism"], int)
      or given["array_parallelism"] < 1):
    raise ValueError(f"--slurm.array_parallelism="
                     f"{given['array_parallelism']!r} must be an integer >= 1")
  if "mem_gb" in given and (isinstance(given["mem_gb"], bool) or not
                            isinstance(given["mem_gb"], (int, float))
                            or given["mem_gb"] < 0):
    raise ValueError(f"--slurm.mem_gb={given['mem_gb']!r} must be a number "
                     ">= 0")
  for k in ("partition", "folder"):
    if k in given and not isinstance(given[k], str):
      raise ValueError(f"--slurm.{k}={given[k]!r} must be a string")
  extra = dict(given.get("extra") or {})
  for k, v in extra.items():
    if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
      raise ValueError(f"--slurm.extra: {k!r}: {v!r} must map an sbatch "
                       "option name to a string, number or true")
    if k.replace("-", "_") in SETTINGS:
      raise ValueError(f"--slurm.extra: {k!r} is a setting of its own: use "
                       f"--slurm.{k.replace('-', '_')}")
  given["extra"] = extra
  settings = Settings(**given)
  if settings.signal_delay_s >= settings.time_min * 60:
    raise ValueError(f"--slurm.signal_delay_s={settings.signal_delay_s} must "
                     f"be under --slurm.time ({settings.time_min} min)")
  return settings


def shards(names: Sequence[str], array_size: int) -> list[list[str]]:
  """The runs of each array task: one each, or round-robin into N."""
  if not array_size:
    return [[n] for n in names]
  return [list(names[i::array_size]) for i in range(min(array_size,
                                                        len(names)))]


# --- The task -----------------------------------------------------------------


class SweepTask:
  """One array task: `run_shard(variants=names)`, requeued on preemption.

  submitit's Checkpointable protocol is duck-typed (its signal handler looks
  for a `checkpoint` method); defining it here keeps submitit out of
  jaxreg's imports until a launcher is used. The requeued task is this same
  object: its state is on disk, in the run directories.
  """

  def __init__(self, run_shard: Callable[..., list], names: Sequence[str],
               index: int, folder: str):
    self.run_shard, self.names = run_shard, list(names)
    self.index, self.folder = index, folder

  def __call__(self) -> list[dict]:
    from jaxreg import checkpoint  # Imports JAX: in the task, not before.
    logging.set_verbosity(logging.INFO)
    self._record_attempt()
    with Preemption() as preemption:
      try:
        return self.run_shard(variants=self.names)
      except checkpoint.Interrupted:
        if preemption.signum is not None:
          preemption.requeue()  # Does not return under submitit.
        raise

  def checkpoint(self):
    """submitit: what to run when requeued (the same task; it resumes)."""
    from submitit import helpers
    return helpers.DelayedSubmission(self)

  def _record_attempt(self) -> None:
    path = Path(self.folder) / "tasks" / f"{self.index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # One writer: this task, one attempt at once.
      f.write(json.dumps({
          "pid": os.getpid(), "host": socket.gethostname(),
          "job_id": os.environ.get("SLURM_JOB_ID")
          or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
          "variants": self.names, "time": time.time()}) + "\n")


def preemption_signal() -> signal.Signals:
  """The signal submitit treats as preemption/timeout (USR2 unless
  $SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
  return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL",
                                                "USR2"))


class Preemption:
  """In a task: submitit's preemption signal first stops the run with a
  checkpoint (jaxreg's SIGTERM handler, when a run is training), and only
  then reaches submitit's handler (`requeue`)."""

  def __init__(self):
    self.sig = preemption_signal()
    self.signum: int | None = None
    self._previous: Any = None  # submitit's handler, in a task.

  def __enter__(self) -> Preemption:
    self._previous = signal.signal(self.sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(self.sig, self._previous)

  def _handle(self, signum: int, frame) -> None:
    from jaxreg import checkpoint
    first = self.signum is None
    self.signum = signum
    stop = signal.getsignal(signal.SIGTERM)
    if isinstance(getattr(stop, "__self__", None), checkpoint.StopSignals):
      if first:
        logging.warning("%s (preemption or time limit): saving a checkpoint, "
                        "then requeueing", signal.Signals(signum).name)
        stop(signal.SIGTERM, frame)  # Interrupted after the checkpoint.
    else:  # No run is training: nothing to save.
      self.requeue(frame)

  def requeue(self, frame=None) -> None:
    """Hands the signal to submitit's handler: `checkpoint()`, requeue,
    exit. Outside submitit, stops the task (exit 128 + the signal)."""
    signal.signal(self.sig, self._previous)
    if not callable(self._previous):
      raise SystemExit(128 + self.sig)
    self._previous(self.sig, frame)


# --- Submitting and waiting ---------------------------------------------------


def make_executor(launcher: str, folder: Path, settings: Settings,
                  job_name: str = "jaxreg"):
  """submitit's executor for `launcher` with `settings` applied."""
  import submitit
  if launcher == "local":
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=settings.time_min,
                         signal_delay_s=settings.signal_delay_s,
                         gpus_per_node=settings.gpus_per_task)
    return ex
  params = dict(job_name=job_name, time=settings.time_min, nodes=1,
                ntasks_per_node=1, signal_delay_s=settings.signal_delay_s,
                array_parallelism=settings.array_parallelism,
                # Requeue-able: after `scontrol requeue`, a node failure or
                # a preemption SLURM handles itself.
                additional_parameters={"requeue": True, **settings.extra})
  if settings.partition:
    params["partition"] = settings.partition
  if settings.gpus_per_task:
    params["gpus_per_task"] = settings.gpus_per_task
  if settings.cpus_per_task:
    params["cpus_per_task"] = settings.cpus_per_task
  if settings.mem_gb:
    params["mem"] = (f"{int(settings.mem_gb)}GB" if settings.mem_gb ==
                     int(settings.mem_gb) else f"{int(settings.mem_gb * 1024)}MB")
  ex = submitit.SlurmExecutor(folder=folder)
  ex.update_parameters(**params)
  return ex


def folder_of(workdir: Path, settings: Settings) -> Path:
  return Path(settings.folder or Path(workdir) / DEFAULT_FOLDER).absolute()


def submit_slurm(run_shard: Callable[..., list], names: Sequence[str],
                 workdir: Path, settings: Settings,
                 job_name: str = "jaxreg") -> list:
  """Submits the tasks as one SLURM job array; returns submitit's jobs."""
  folder = folder_of(workdir, settings)
  tasks = [SweepTask(run_shard, g, i, str(folder))
           for i, g in enumerate(shards(names, settings.array_size))]
  jobs = make_executor("slurm", folder, settings, job_name).submit_array(tasks)
  logging.info("submitted SLURM array %s: %d tasks (logs in %s)",
               jobs[0].job_id.split("_")[0], len(jobs), folder)
  return jobs


def _run_local(run_shard, names, workdir, settings, job_name) -> list:
  """Runs the tasks as local submitit jobs, at most array_parallelism at a
  time (submitit's local executor starts whatever it is given)."""
  folder = folder_of(workdir, settings)
  ex = make_executor("local", folder, settings, job_name)
  tasks = [SweepTask(run_shard, g, i, str(folder))
           for i, g in enumerate(shards(names, settings.array_size))]
  jobs: list = [None] * len(tasks)
  running: list[int] = []
  main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main else None
  try:
    for i, task in enumerate(tasks):
      while len(running) >= settings.array_parallelism:
        time.sleep(LOCAL_POLL_S)
        running = [j for j in running if not jobs[j].done()]
      jobs[i] = ex.submit(task)
      running.append(i)
    for job in jobs:
      job.wait()
  except BaseException:
    _stop_local([j for j in jobs if j is not None])
    raise
  finally:
    if main:
      signal.signal(signal.SIGTERM, previous)
  return jobs


def _exit_on_signal(signum: int, frame) -> None:
  del frame
  raise SystemExit(128 + signum)


def _stop_local(jobs: Sequence) -> None:
  """No orphans: a stopped local launcher stops its tasks as SLURM would,
  with SIGTERM (a training run saves a checkpoint and exits 143; relaunching
  resumes), and waits for them."""
  live = [j for j in jobs if not j.done()]
  for job in live:
    # A local job's id is its controller's pid (submitit/local/local.py),
    # which passes SIGTERM on to its task.
    os.kill(int(job.job_id), signal.SIGTERM)
  deadline = time.time() + LOCAL_STOP_WAIT_S
  while any(not j.done() for j in live) and time.time() < deadline:
    time.sleep(LOCAL_POLL_S)
  for job in live:
    if not job.done():
      job.cancel(check=False)  # SIGINT, then SIGKILL.


def launch(launcher: str, run_shard: Callable[..., list],
           names: Sequence[str], workdir: str | os.PathLike,
           slurm: dict | None = None, *, job_name: str = "jaxreg"
           ) -> list[dict]:
  """Runs `run_shard(variants=[...])` for `names` as array tasks of
  `launcher` and waits for all of them.

  Returns the rows the tasks returned (a task that ended without a result,
  e.g. stopped by SIGTERM or failed outright, is logged and returns none:
  its runs' rows come from their run directories).
  """
  settings = check(launcher, slurm)
  if not names:
    return []
  workdir = Path(workdir)
  if launcher == "slurm":
    jobs = submit_slurm(run_shard, names, workdir, settings, job_name)
  else:
    jobs = _run_local(run_shard, names, workdir, settings, job_name)
  rows = []
  for job in jobs:
    try:
      rows.extend(job.result())
    except Exception as e:  # pylint: disable=broad-except
      last = (str(e).strip().splitlines() or [""])[-1]
      logging.error("task %s ended without a result (%s: %s); its runs "
                    "resume when the same command is launched again; log: "
                    "%s", job.job_id, type(e).__name__, last, job.paths.stderr)
  return rows

