"""The command line: `jaxreg --config=configs/<study>.py[:arg]`.

The same flags serve the `jaxreg` console script, `python -m jaxreg` and
`python launch.py` (which only calls `run()`). Override any config field as
`--config.optimizer.lr=0.1`; a misspelled field is an error. `--config`
paths are relative to the current directory (run from the repository root).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxreg import launchers  # Light: submitit is imported when used.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config file, e.g. configs/mnist.py or "
    "configs/agc.py:smoke.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: results/<config stem>).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the variants this invocation would run, then "
    "'N variants', and exit.")
_VARIANTS = flags.DEFINE_multi_string(
    "variants", None, "Run only this variant (a name as --dry_run prints "
    "it; names contain commas, so repeat the flag for several).")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 1, "Split the variants over this many machines/jobs.")
_SHARD_INDEX = flags.DEFINE_integer(
    "shard_index", None, "This job's shard in [0, num_shards) (default: "
    "$SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX, or 0).")
_DEVICES_PER_RUN = flags.DEFINE_integer(
    "devices_per_run", 0, "Devices per run. 0: a single run uses every "
    "device; a sweep runs one variant per device side by side. N: each run "
    "is data-parallel over N devices.")
_WORKERS_PER_DEVICE = flags.DEFINE_integer(
    "workers_per_device", 1, "Side-by-side sweep workers per device group "
    "(>1: they share its memory, each preallocating none and taking "
    "0.9/N of it), for variants too small to fill a GPU.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "One run over several processes or hosts: start "
    "the same command in each; jax.distributed finds the others from the "
    "cluster (SLURM, Open MPI, Kubernetes, TPU) or from "
    "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID. "
    "Only process 0 writes results; all write checkpoints.")
_STACK = flags.DEFINE_bool(
    "stack", False, "Train variants that differ only in lr, weight decay, "
    "L1, AGC clip, momentum or seed together as one stacked group "
    "(jaxreg/stacked.py); each still gets its own run directory.")
_STACK_MODE = flags.DEFINE_enum(
    "stack_mode", "auto", ["auto", "vmap", "loop"], "With --stack: vmap "
    "(one batched program), loop (one compiled step, members in turn; "
    "bit-identical to separate runs) or auto (loop on CPU, vmap elsewhere).")
_SEEDS = flags.DEFINE_integer(
    "seeds", None, "Run every variant for seeds 0..N-1 as replicas "
    "<variant>/seed=K (default: config.num_seeds, 1); the report gives "
    "means, confidence intervals and tests against the study's baseline.")
_REPORT = flags.DEFINE_bool(
    "report", True, "Write <workdir>/report.md and figures at the end.")
_LAUNCHER = flags.DEFINE_enum(
    "launcher", None, list(launchers.LAUNCHERS), "Submit the runs as "
    "submitit array tasks instead of training here: slurm (one sbatch "
    "--array; requeued on preemption) or local (local processes). Waits for "
    "them, then writes summary.csv and the report as usual.")
# --slurm.<setting> (launchers.Settings), each its own flag.
_SLURM = {
    "partition": flags.DEFINE_string(
        "slurm.partition", "", "With --launcher=slurm: the partition "
        "(default: the cluster's)."),
    "gpus_per_task": flags.DEFINE_integer(
        "slurm.gpus_per_task", 0, "GPUs per array task (0: none requested; "
        "local: the GPUs 0..N-1 a task sees).", lower_bound=0),
    "cpus_per_task": flags.DEFINE_integer(
        "slurm.cpus_per_task", 0, "CPUs per array task (0: the cluster's "
        "default).", lower_bound=0),
    "time": flags.DEFINE_string(
        "slurm.time", str(launchers.Settings.time), "Time limit of a task: "
        "minutes or [D-]HH:MM[:SS]. USR2 comes signal_delay_s before it: "
        "the run checkpoints, the task is requeued and resumes."),
    "mem_gb": flags.DEFINE_float(
        "slurm.mem_gb", 0, "Memory per task in GB (0: the cluster's "
        "default).", lower_bound=0),
    "array_size": flags.DEFINE_integer(
        "slurm.array_size", 0, "Array tasks: 0, one per run (variant x "
        "seed); N, the runs split round-robin into N tasks.", lower_bound=0),
    "array_parallelism": flags.DEFINE_integer(
        "slurm.array_parallelism", launchers.Settings.array_parallelism,
        "At most this many tasks run at once.", lower_bound=1),
    "signal_delay_s": flags.DEFINE_integer(
        "slurm.signal_delay_s", launchers.Settings.signal_delay_s,
        "SLURM sends USR2 this long before the time limit: the run saves a "
        "checkpoint and the task is requeued.", lower_bound=0),
    "folder": flags.DEFINE_string(
        "slurm.folder", "", "submitit's scripts, pickles and logs "
        "(default: <workdir>/submitit; on SLURM, a shared filesystem)."),
    "extra": flags.DEFINE_multi_string(
        "slurm.extra", None, "More #SBATCH options as name=value, e.g. "
        "--slurm.extra=qos=high --slurm.extra=account=ml (a bare name is "
        "a switch: --slurm.extra=exclusive)."),
}
_FAIL_ON_DIVERGED = flags.DEFINE_bool(
    "fail_on_diverged", False, "Exit with status 3 when a variant diverged "
    "(by default a diverged run is a result of the study: status 0).")


def default_workdir(config_path: str) -> str:
  return os.path.join("results", Path(config_path.partition(":")[0]).stem)


SHARD_INDEX_VARS = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")


def default_shard_index() -> int | None:
  """The array index a cluster scheduler gives this job, else None."""
  for var in SHARD_INDEX_VARS:
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return None


class Refused(ValueError):
  """The command was refused before anything ran (exit status 2)."""


def launch(config_path: str, *, overrides: dict | None = None,
           workdir: str | None = None, dry_run: bool = False,
           variants: list[str] | None = None, num_shards: int = 1,
           shard_index: int | None = None, devices_per_run: int = 0,
           distributed: bool = False, report: bool = True,
           stack: bool = False, stack_mode: str = "auto",
           seeds: int | None = None, launcher: str | None = None,
           slurm: dict | None = None,
           workers_per_device: int = 1) -> list[dict]:
  """What the command does once its flags are parsed: set up the process,
  run the study's variants (here, or as `launcher` array tasks with the
  `slurm` settings), write the report. Returns the summary rows."""
  from jaxreg import sweep  # After absl parsed the flags.
  if launcher is not None:
    launchers.check(launcher, slurm)  # Before anything is submitted.
    if distributed:
      raise Refused("--distributed and --launcher do not combine: each "
                    "launcher task is one process (README, \"Several "
                    "machines\", for one run over several hosts)")
  elif slurm:
    raise Refused(f"--slurm.{next(iter(slurm))} needs --launcher=slurm (or "
                  "local)")
  workdir = workdir or default_workdir(config_path)
  if shard_index is None:
    shard_index = default_shard_index()
  if shard_index is None:
    if num_shards > 1:
      # Every job would silently run shard 0.
      raise Refused(
          f"--num_shards={num_shards} needs this job's index: pass "
          f"--shard_index=I (0 <= I < {num_shards}) or run it as a job array "
          f"(${' / $'.join(SHARD_INDEX_VARS)})")
    shard_index = 0
  if not dry_run and launcher is None:  # Tasks set themselves up.
    from jaxreg import runtime
    runtime.setup(distributed=distributed)  # Before JAX starts a backend.
    logging.set_verbosity(logging.INFO)
  rows = sweep.run(config_path, workdir=workdir, overrides=overrides,
                   variants=variants, num_shards=num_shards,
                   shard_index=shard_index, devices_per_run=devices_per_run,
                   dry_run=dry_run, stack=stack, stack_mode=stack_mode,
                   seeds=seeds, launcher=launcher, slurm=slurm,
                   workers_per_device=workers_per_device)
  if dry_run:
    return rows
  for r in rows:
    if r["status"] == "refused":
      logging.error("%s: refused: %s", r["variant"], r["error"])
    else:
      logging.info("%s: %s, test accuracy %s", r["variant"], r["status"],
                   r.get("test_accuracy"))
  import jax
  ran = any(r["status"] != "refused" for r in rows)
  if report and ran and jax.process_index() == 0:
    from jaxreg import report as report_lib
    path = report_lib.build_report(workdir)
    logging.info("report: %s", path)
  return rows


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxreg import sweep
  try:
    rows = launch(
        config_flags.get_config_filename(flags.FLAGS["config"]),
        overrides=config_flags.get_override_values(flags.FLAGS["config"]),
        workdir=_WORKDIR.value, dry_run=_DRY_RUN.value,
        variants=_VARIANTS.value, num_shards=_NUM_SHARDS.value,
        shard_index=_SHARD_INDEX.value,
        devices_per_run=_DEVICES_PER_RUN.value,
        distributed=_DISTRIBUTED.value, report=_REPORT.value,
        stack=_STACK.value, stack_mode=_STACK_MODE.value,
        seeds=_SEEDS.value, launcher=_LAUNCHER.value,
        slurm=_slurm_settings(),
        workers_per_device=_WORKERS_PER_DEVICE.value)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    # Refusals before anything ran (unknown variant, bad shard, a config
    # that does not load): one line; a traceback only with --verbosity.
    if logging.get_verbosity() > logging.INFO:
      raise
    _refuse(e)
  if _DRY_RUN.value:
    sys.exit(sweep.OK)
  sys.exit(sweep.exit_status(rows, fail_on_diverged=_FAIL_ON_DIVERGED.value))


def _slurm_settings() -> dict:
  """The --slurm.* settings given on the command line (a plain dict)."""
  given = {k: f.value for k, f in _SLURM.items() if f.present}
  if "extra" in given:
    pairs = [e.partition("=") for e in given["extra"]]
    given["extra"] = {k: v if sep else True for k, sep, v in pairs}
  return given


def _refuse(error: BaseException) -> None:
  message = error.args[0] if isinstance(error, KeyError) and error.args \
      else str(error)
  print(f"jaxreg: refused: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a config override that names no field (or a value
  of the wrong type) refused in one line instead of ml_collections'
  traceback; `--verbosity=1` (or more) shows the traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    hint = ("\nValid --slurm settings: " + ", ".join(launchers.SETTINGS)
            if "'slurm." in str(e) else "")
    print(f"jaxreg: {e}{hint}\nPass --helpshort to list the flags.",
          file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    if any(a.startswith(("--verbosity", "-v")) and not a.endswith(("=0",
                                                                   "=-1"))
           for a in argv[1:]):
      raise
    _refuse(_explain_override(argv, e))
  return []


def _explain_override(argv: list[str], error: BaseException) -> Exception:
  """A config override's failure, as a ValueError naming the key and the
  closest valid keys."""
  import difflib
  from jaxreg import config as config_lib
  path = next((a.split("=", 1)[1] for a in argv[1:]
               if a.startswith("--config=")), None)
  given = [a[2:].split("=", 1)[0] for a in argv[1:]
           if a.startswith("--config.")]
  try:
    module, arg = config_lib.load_config_file(path)
    valid = config_lib.dotted_keys(module.get_config(arg))
  except Exception:  # pylint: disable=broad-except
    return ValueError(f"{type(error).__name__}: {error}")
  for key in given:
    dotted = key.partition(".")[2]
    if dotted not in valid:
      close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(close)}?" if close else (
          "; --config.<section>.<field> names a field of the config (see "
          "jaxreg/config.py)")
      return ValueError(f"--config.{dotted}: config {path} has no field "
                        f"{dotted!r}{hint}")
  return ValueError(f"{type(error).__name__}: {error}")


def run() -> None:
  """Entry point of the `jaxreg` console script, `python -m jaxreg` and
  launch.py."""
  flags.mark_flags_as_required(["config"])
  # --helpshort lists the main module's key flags (absl keys them by
  # sys.argv[0]: launch.py, jaxreg/__main__.py or the console script), and
  # the flags are defined here: make them that module's too.
  main = sys.argv[0] if sys.argv else "__main__"
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(main, flag)
  app.run(_main, flags_parser=_parse_flags)
