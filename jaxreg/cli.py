"""The command line: `jaxreg --config=configs/<study>.py[:arg]`.

The same flags serve the `jaxreg` console script, `python -m jaxreg` and
`python launch.py` (which only calls `run()`). Override any config field as
`--config.optimizer.lr=0.1`; a misspelled field is an error. `--config`
paths are relative to the current directory (run from the repository root).
"""
from __future__ import annotations

import os
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one run "
    "over the devices of several hosts.")
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


def default_workdir(config_path: str) -> str:
  return os.path.join("results", Path(config_path.partition(":")[0]).stem)


def default_shard_index() -> int:
  """The array index a cluster scheduler gives this job, else 0."""
  for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return 0


def launch(config_path: str, *, overrides: dict | None = None,
           workdir: str | None = None, dry_run: bool = False,
           variants: list[str] | None = None, num_shards: int = 1,
           shard_index: int | None = None, devices_per_run: int = 0,
           distributed: bool = False, report: bool = True,
           stack: bool = False, stack_mode: str = "auto",
           seeds: int | None = None) -> list[dict]:
  """What the command does once its flags are parsed: set up the process,
  run the study's variants, write the report. Returns the summary rows."""
  from jaxreg import sweep  # After absl parsed the flags.
  workdir = workdir or default_workdir(config_path)
  if shard_index is None:
    shard_index = default_shard_index()
  if not dry_run:
    from jaxreg import runtime
    runtime.setup(distributed=distributed)  # Before JAX starts a backend.
    logging.set_verbosity(logging.INFO)
  rows = sweep.run(config_path, workdir=workdir, overrides=overrides,
                   variants=variants, num_shards=num_shards,
                   shard_index=shard_index, devices_per_run=devices_per_run,
                   dry_run=dry_run, stack=stack, stack_mode=stack_mode,
                   seeds=seeds)
  if dry_run:
    return rows
  for r in rows:
    logging.info("%s: %s, test accuracy %s", r["variant"], r["status"],
                 r.get("test_accuracy"))
  import jax
  if report and jax.process_index() == 0:
    from jaxreg import report as report_lib
    path = report_lib.build_report(workdir)
    logging.info("report: %s", path)
  return rows


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch(config_flags.get_config_filename(flags.FLAGS["config"]),
         overrides=config_flags.get_override_values(flags.FLAGS["config"]),
         workdir=_WORKDIR.value, dry_run=_DRY_RUN.value,
         variants=_VARIANTS.value, num_shards=_NUM_SHARDS.value,
         shard_index=_SHARD_INDEX.value,
         devices_per_run=_DEVICES_PER_RUN.value,
         distributed=_DISTRIBUTED.value, report=_REPORT.value,
         stack=_STACK.value, stack_mode=_STACK_MODE.value,
         seeds=_SEEDS.value)


def run() -> None:
  """Entry point of the `jaxreg` console script, `python -m jaxreg` and
  launch.py."""
  flags.mark_flags_as_required(["config"])
  app.run(_main)
