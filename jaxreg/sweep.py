"""Sweeps: every variant of a study, resumable, sharded over devices and machines.

A study file's `get_sweep(arg)` lists variants as dicts of dotted overrides.
`run()` trains each into `<workdir>/<variant name>/` and keeps
`<workdir>/summary.csv` current after every variant, so a sweep killed at any
point loses at most the variant in flight, and a relaunch skips what is done.

Three ways to spread the work:
  * machines: `num_shards`/`shard_index` give each machine a deterministic
    slice (round-robin over the study's variant list);
  * accelerators of one machine, side by side: one worker process per group
    of `devices_per_run` devices, each seeing only its own devices;
  * one run over several devices (or hosts), data-parallel: `devices_per_run`
    > 1, or `jax.distributed` for several hosts.

Run as a worker (internal): `python -m jaxreg.sweep --spec=<spec.json>`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ml_collections
from absl import logging

from jaxreg import config as config_lib
from jaxreg import locks
from jaxreg import replicas
from jaxreg import results
from jaxreg import workers as workers_lib

SUMMARY_COLUMNS = results.SUMMARY_COLUMNS
# --stack_mode choices (stacked.MODES, without importing JAX here).
STACK_MODES = ("auto", "vmap", "loop")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: dict


# --- Naming -----------------------------------------------------------------


def format_value(v: Any) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, (tuple, list)):
    return "-".join(format_value(x) for x in v)
  return str(v)


def variant_name(overrides: dict) -> str:
  """`{"model.norm": "group", "optimizer.l1": 1e-4}` -> "norm=group,l1=0.0001".

  Keys are shortened to their last component unless two share it. The name
  is stable (insertion order of the sweep file) and filesystem-safe.
  """
  if not overrides:
    return "default"
  leaves = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for key, leaf in zip(overrides, leaves):
    label = leaf if leaves.count(leaf) == 1 else key
    parts.append(f"{label}={format_value(overrides[key])}")
  name = ",".join(parts)
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def make_variants(sweep: Iterable[dict]) -> list[Variant]:
  variants = [Variant(variant_name(o), dict(o))
              for o in config_lib.dedupe(sweep)]
  names = [v.name for v in variants]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"variants share names {dupes}: make their overrides "
                     "differ in a visible way")
  return variants


def replicate(variants: Sequence[Variant], num_seeds: int) -> list[Variant]:
  """Each variant as `num_seeds` replicas `<variant>/seed=K` (replicas.py)."""
  return [Variant(n, o) for v in variants
          for n, o in replicas.replicas(v.name, v.overrides, num_seeds)]


def shard(variants: Sequence[Variant], num_shards: int,
          shard_index: int) -> list[Variant]:
  """Round-robin slice: deterministic, balanced, independent of what ran."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} must be in [0, num_shards="
                     f"{num_shards})")
  return list(variants[shard_index::num_shards])


def select(variants: Sequence[Variant], names: Sequence[str]) -> list[Variant]:
  """The variants named (a variant's name selects all its replicas)."""
  by_name = {v.name: v for v in variants}
  return [by_name[n] for n in replicas.expand_names(list(by_name), names)]


# --- The table --------------------------------------------------------------


def _axes(variants: Sequence[Variant]) -> list[str]:
  axes: list[str] = []
  for v in variants:
    axes.extend(k for k in v.overrides if k not in axes)
  return axes


def _row(variant: Variant, summary: dict | None, axes: Sequence[str]) -> dict:
  summary = summary or {"status": "pending"}
  row = {"variant": variant.name, "status": summary.get("status")}
  for a in axes:
    row[a] = variant.overrides.get(a, "")
  for c in SUMMARY_COLUMNS:
    row[c] = summary.get(c)
  return row


def write_table(workdir: Path, variants: Sequence[Variant],
                refused: dict[str, dict] | None = None) -> list[dict]:
  """Rebuilds summary.csv from every variant's summary.json on disk.

  Reading the disk (not memory) lets shards on several machines sharing one
  filesystem each write a complete table; the table lock makes the last
  writer the one that read every other's results. A variant this job
  refused keeps the row its directory gives (its old results); `refused`
  rows stand only for variants without any.
  """
  axes = _axes(variants)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=["variant", "status", *axes,
                                           *SUMMARY_COLUMNS])
  writer.writeheader()
  with locks.table_lock(workdir, enabled=results.is_writer()):
    rows = []
    for v in variants:
      summary = results.read_summary(workdir / v.name)
      rows.append(_row(v, summary, axes) if summary is not None or
                  v.name not in (refused or {}) else refused[v.name])
    for r in rows:
      writer.writerow({k: ("" if val is None else format_value(val)
                           if isinstance(val, (tuple, list)) else val)
                       for k, val in r.items()})
    results.write_atomic(workdir / "summary.csv", buf.getvalue())
  return rows


# --- Running ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Study:
  """A study resolved from a config file or a ConfigDict."""
  base: ml_collections.ConfigDict  # With the job's overrides applied.
  variants: list  # [Variant], every variant of the study.
  path: str | None  # The config file ("configs/agc.py:smoke"), if any.
  report: dict  # The study file's get_report(arg), or {}.


def resolve(config: str | ml_collections.ConfigDict,
            overrides: dict | None = None,
            sweep: Sequence[dict] | None = None) -> Study:
  """The Study of a config path or a ConfigDict."""
  path, report = None, {}
  if isinstance(config, (str, os.PathLike)):
    path = str(config)
    module, arg = config_lib.load_config_file(path)
    base = module.get_config(arg)
    if sweep is None:
      sweep = module.get_sweep(arg) if hasattr(module, "get_sweep") else [{}]
    if hasattr(module, "get_report"):
      report = dict(module.get_report(arg) or {})
  else:
    base = config
  base = config_lib.apply_overrides(base, overrides or {})
  return Study(base, make_variants(sweep if sweep is not None else [{}]),
               path, report)


def _is_single(variants: Sequence[Variant]) -> bool:
  return len(variants) == 1 and not variants[0].overrides


@dataclasses.dataclass(frozen=True)
class Job:
  """A variant resolved, validated and checked against its run directory,
  once: what the sweep runs, skips or records as refused."""
  variant: Variant
  run_dir: Path
  config: ml_collections.ConfigDict | None  # None when refused.
  prior: Any = None  # record.Prior when not refused.
  error: str | None = None  # Why it was refused.


def prepare(base: ml_collections.ConfigDict, variant: Variant, run_dir: Path,
            num_devices: int) -> Job:
  """The Job of `variant`: its config (base + overrides, and
  train.num_devices when given), validated and checked against `run_dir`.
  A refusal (a bad config, a run directory of another config) is kept as
  the Job's error; nothing is written."""
  from jaxreg import record, validation  # Import JAX; keep dry runs light.
  try:
    overrides = dict(variant.overrides)
    if num_devices:
      overrides["train.num_devices"] = num_devices
    cfg = config_lib.apply_overrides(base, overrides)
    validation.validate(cfg)
    prior = record.check_prior(cfg, run_dir)
  except Exception as e:  # pylint: disable=broad-except
    logging.error("variant %s refused: %s: %s", variant.name,
                  type(e).__name__, e)
    return Job(variant, run_dir, None, error=f"{type(e).__name__}: {e}")
  return Job(variant, run_dir, cfg, prior)


def run(config: str | ml_collections.ConfigDict, *,
        workdir: str | os.PathLike,
        overrides: dict | None = None,
        sweep: Sequence[dict] | None = None,
        variants: Sequence[str] | None = None,
        num_shards: int = 1, shard_index: int = 0,
        devices_per_run: int = 0,
        side_by_side: bool = True,
        dry_run: bool = False,
        print_fn: Callable[[str], None] = print,
        stack: bool = False, stack_mode: str = "auto",
        seeds: int | None = None,
        workers_per_device: int = 1,
        launcher: str | None = None, slurm: dict | None = None
        ) -> list[dict]:
  """Runs a study's variants; returns one summary row per run.

  Args:
    config: a config file path ("configs/agc.py:smoke") or a ConfigDict.
    workdir: where run directories and summary.csv go.
    overrides: dotted overrides applied to every variant.
    sweep: the variants as dicts of dotted overrides (default: the file's
      `get_sweep(arg)`; for a ConfigDict, one run of it as is).
    variants: names of the variants to run (default all).
    num_shards, shard_index: this machine's slice of the variants.
    devices_per_run: devices each run uses; 0 = all devices for a single run,
      one device per variant side by side for a sweep.
    side_by_side: with several local devices, run variants in parallel
      worker processes, each seeing only its `devices_per_run` devices.
      False runs them one after another in this process.
    dry_run: print the variants and return without training.
    stack: train variants that differ only in continuous hyperparameters or
      the seed together, one group per set of them (jaxreg/stacked.py); the
      others, and variants with a finished run or a single run's
      checkpoints, run one by one as usual. Run directories are the same.
    stack_mode: "auto", "vmap" or "loop" (see jaxreg/stacked.py).
    seeds: run every variant for seeds 0..seeds-1 as replicas
      `<variant>/seed=K` (see `replicate`); default `config.num_seeds`.
    workers_per_device: side-by-side workers sharing each device group
      (GPU memory split between them; workers.worker_env).
    launcher: None trains here; "slurm" or "local" submits the runs as
      submitit array tasks that each run this function for their variants
      into `workdir`, waits for them and returns the rows of the table they
      leave (jaxreg/launchers.py).
    slurm: the launcher's settings (launchers.Settings: partition,
      gpus_per_task, cpus_per_task, time, mem_gb, array_size,
      array_parallelism, signal_delay_s, folder, extra).
  """
  if workers_per_device < 1:
    raise ValueError(f"workers_per_device={workers_per_device} must be >= 1 "
                     "(side-by-side workers sharing each device)")
  if devices_per_run < 0:
    raise ValueError(f"devices_per_run={devices_per_run} must be >= 0 "
                     "(0: all devices for one run, one each in a sweep)")
  if stack_mode not in STACK_MODES:
    raise ValueError(f"stack_mode={stack_mode!r}; valid choices: "
                     f"{', '.join(STACK_MODES)}")
  study = resolve(config, overrides, sweep)
  num_seeds = study.base.get("num_seeds", 1) if seeds is None else seeds
  all_variants = replicate(study.variants, num_seeds)
  todo = select(all_variants, variants) if variants else all_variants
  todo = shard(todo, num_shards, shard_index)
  if dry_run:
    for v in todo:
      print_fn(f"{v.name}  {json.dumps(v.overrides)}")
    print_fn(replicas.count_line([v.name for v in todo], num_seeds))
    return [_row(v, None, _axes(all_variants)) for v in todo]
  if launcher is None and slurm:
    raise ValueError(f"slurm={slurm!r} needs launcher='slurm' (or 'local')")
  if launcher is not None:  # Each array task runs this function again.
    from jaxreg import launchers  # Imports submitit; only when asked for.
    task_rows = launchers.launch(launcher, functools.partial(
        run, config, workdir=str(Path(workdir).absolute()),
        overrides=overrides, sweep=sweep,
        devices_per_run=devices_per_run, side_by_side=False, stack=stack,
        stack_mode=stack_mode, seeds=num_seeds, print_fn=print_fn),
        [v.name for v in todo], workdir, slurm,
        job_name=study.base.get("name", "jaxreg"))
    return _gathered(Path(workdir), all_variants, todo, task_rows)
  from jaxreg import runtime  # Imports JAX; keep dry runs light.
  runtime.setup()
  workdir = Path(workdir)
  axes = _axes(all_variants)
  # One run over several processes (jax.distributed): every process runs
  # the same sweep in lockstep and only process 0 writes, so no variant
  # locks: a process skipping a variant the others train would hang them.
  import jax
  use_locks = jax.process_count() == 1
  if _is_single(all_variants):
    job = prepare(study.base, all_variants[0], workdir, devices_per_run)
    locked = use_locks and job.error is None
    with locks.maybe_lock(workdir, job.variant.name, locked):  # Waits.
      if locked:  # Again: another job may have finished it meanwhile.
        job = prepare(study.base, job.variant, workdir, devices_per_run)
      if job.error is not None:
        return [_row(job.variant, {"status": "refused", "error": job.error},
                     [])]
      try:
        summary = _run_jobs([job], stack_mode)[0]
      except Exception as e:  # Recorded in its summary.json.
        logging.exception("%s failed", workdir)
        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
      return [_row(job.variant, summary, [])]

  jobs = [prepare(study.base, v, workdir / v.name, devices_per_run)
          for v in todo]
  refused = {j.variant.name: _row(j.variant, {"status": "refused",
                                              "error": j.error}, axes)
             for j in jobs if j.error is not None}
  if len(refused) == len(jobs):
    # Nothing to run: leave every file as it was.
    return list(refused.values())
  workdir.mkdir(parents=True, exist_ok=True)
  with locks.table_lock(workdir, enabled=results.is_writer()):
    results.write_json(workdir / "sweep.json", {
        "study": study.base.name, "config": study.path, "axes": axes,
        "variants": [dataclasses.asdict(v) for v in all_variants],
        "num_seeds": num_seeds, "report": study.report})
  runnable = [j for j in jobs if j.error is None]
  workers = (workers_lib.plan_workers(devices_per_run, len(runnable),
                                      workers_per_device)
             if side_by_side else [])
  if workers:
    workers_lib.run_workers(workers, study.path, study.base, overrides, sweep,
                            [j.variant for j in runnable], workdir,
                            stack=stack, stack_mode=stack_mode,
                            seeds=num_seeds)
    return _table_rows(workdir, all_variants, todo, refused)

  done_count = 0
  groups = _stack_groups(jobs) if stack else [[j] for j in jobs]
  with contextlib.closing(locks.each_locked(
      workdir, groups, lambda g: [] if any(j.error for j in g) else
      [j.variant.name for j in g], enabled=use_locks, on_held=lambda g:
      print_fn(f"{g[0].variant.name}: held by another job; back to it later")
      )) as turns:
    for group in turns:
      names = [j.variant.name for j in group]
      if len(group) > 1:
        print_fn(f"[{done_count + 1}-{done_count + len(group)}/{len(todo)}] "
                 f"stacked: {', '.join(names)}")
      else:
        print_fn(f"[{done_count + 1}/{len(todo)}] {names[0]}")
      done_count += len(group)
      if any(j.error is not None for j in group):
        continue  # Refused: nothing of it is touched (prepare logged why).
      # Prepared again under its locks: another job may have finished or
      # checkpointed a member meanwhile (then skipped, or resumed alone).
      group = [prepare(study.base, j.variant, j.run_dir, devices_per_run)
               for j in group]
      for sub in _stack_groups(group) if len(group) > 1 else [group]:
        if sub[0].error is not None:
          refused[sub[0].variant.name] = _row(
              sub[0].variant, {"status": "refused", "error": sub[0].error},
              axes)
          continue
        try:
          _run_jobs(sub, stack_mode, workdir)
        except Exception:  # Recorded in its summary.json; the sweep goes on.
          logging.exception("%s failed", ", ".join(names))
      write_table(workdir, all_variants, refused)
  return _table_rows(workdir, all_variants, todo, refused)


def _table_rows(workdir: Path, all_variants: Sequence[Variant],
                todo: Sequence[Variant], refused: dict) -> list[dict]:
  """The rows of `todo`: summary.csv rebuilt, refusals from `refused`."""
  rows = {r["variant"]: r for r in write_table(workdir, all_variants, refused)}
  rows.update(refused)
  return [rows[v.name] for v in todo]


def _gathered(workdir: Path, all_variants: Sequence[Variant],
              todo: Sequence[Variant], task_rows: Sequence[dict]
              ) -> list[dict]:
  """The rows of `todo` after launcher tasks ran them: summary.csv rebuilt
  from the run directories, refusals from the tasks' rows."""
  if _is_single(all_variants):
    summary = results.read_summary(workdir)
    return list(task_rows) or [_row(todo[0], summary, [])]
  refused = {r["variant"]: r for r in task_rows if r["status"] == "refused"}
  if len(refused) == len(todo):
    return [refused[v.name] for v in todo]  # Nothing ran: no table.
  return _table_rows(workdir, all_variants, todo, refused)


# Exit statuses of a job (README, "When things fail"); an interrupted run
# exits with 128 + the signal (checkpoint.Interrupted: 143 for SIGTERM, 130
# for SIGINT) after saving a checkpoint.
OK, FAILED, REFUSED, DIVERGED = 0, 1, 2, 3


def exit_status(rows: Sequence[dict], *, fail_on_diverged: bool = False
                ) -> int:
  """The job's exit status from the rows `run` returned: REFUSED if any
  variant was refused, else FAILED if any failed (or is still "running" or
  "pending" after the job: it did not finish), else DIVERGED if any diverged
  and `fail_on_diverged`, else OK (completed, or already completed)."""
  statuses = {r.get("status") for r in rows}
  if "refused" in statuses:
    return REFUSED
  if statuses & {"failed", "running", "pending", None}:
    return FAILED
  if fail_on_diverged and "diverged" in statuses:
    return DIVERGED
  return OK


def _run_jobs(group: Sequence[Job], stack_mode: str,
              workdir: Path | None = None) -> list[dict]:
  """Trains one group of prepared jobs (a single one runs as itself);
  returns their summaries. Finished ones are returned as they are."""
  from jaxreg import stacked, train
  if len(group) == 1:
    job = group[0]
    if job.prior.kind == "finished":
      logging.info("%s: already %s, skipped", job.run_dir,
                   job.prior.summary["status"])
      return [job.prior.summary]
    return train.run(train.single_plan(job.config, job.run_dir,
                                       variant=job.variant.name,
                                       overrides=job.variant.overrides))
  names = [j.variant.name for j in group]
  stack_dir = workdir / stacked.STACKS_DIR / stacked.group_id(names)
  members = [train.Member(j.config, j.run_dir, j.variant.name,
                          j.variant.overrides) for j in group]
  stacked.check_group_dirs(members, stack_dir)
  return stacked.run_group(stacked.group_plan(members, stack_dir, stack_mode))


def _stack_groups(jobs: Sequence[Job]) -> list[list[Job]]:
  """`jobs` in stackable groups, in order of first appearance. A job runs
  alone (as without stacking) when it was refused (so the error is recorded
  as usual), its directory holds a finished run (skipped) or a single run's
  checkpoints (resumed), or nothing else stacks with it."""
  from jaxreg import stacked
  alone = [j for j in jobs if j.error is not None or j.prior.kind != "fresh"]
  candidates = [j for j in jobs if j not in alone]
  groups = [[candidates[i] for i in g] for g in stacked.group_indices(
      [j.config for j in candidates])]
  # Back in the study's order of first appearance.
  order = {j.variant.name: i for i, j in enumerate(jobs)}
  return sorted(groups + [[j] for j in alone],
                key=lambda g: order[g[0].variant.name])


def _worker_main(spec_path: str) -> int:
  kwargs = workers_lib.worker_args(spec_path)  # Ties it to its launcher.
  from jaxreg import runtime
  runtime.setup()
  logging.set_verbosity(logging.INFO)
  return exit_status(run(**kwargs))


if __name__ == "__main__":
  from absl import app, flags

  _SPEC = flags.DEFINE_string("spec", None, "worker spec (internal)")

  def _main(argv):
    del argv
    sys.exit(_worker_main(_SPEC.value))

  app.run(_main)
