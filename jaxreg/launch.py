"""What `python launch.py` does once its flags are parsed."""
from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import logging

from jaxreg import hostmem
from jaxreg import sweep


def enable_compilation_cache(path: str | None = None) -> None:
  """Persistent XLA cache: a re-run or a sweep variant skips recompiling."""
  path = path or os.environ.get(
      "JAXREG_COMPILATION_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "jaxreg", "xla"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def default_workdir(config_path: str) -> str:
  return os.path.join("results", Path(config_path.partition(":")[0]).stem)


def default_shard_index() -> int:
  """The array index a cluster scheduler gives this job, else 0."""
  for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return 0


def main(config_path: str, *, overrides: dict | None = None,
         workdir: str | None = None, dry_run: bool = False,
         variants: list[str] | None = None, num_shards: int = 1,
         shard_index: int | None = None, devices_per_run: int = 0,
         distributed: bool = False, report: bool = True,
         stack: bool = False, stack_mode: str = "auto") -> list[dict]:
  workdir = workdir or default_workdir(config_path)
  if shard_index is None:
    shard_index = default_shard_index()
  if not dry_run:
    hostmem.tune()  # Before JAX starts its CPU backend.
    logging.set_verbosity(logging.INFO)
    enable_compilation_cache()
    if distributed:
      jax.distributed.initialize()
  rows = sweep.run(config_path, workdir=workdir, overrides=overrides,
                   variants=variants, num_shards=num_shards,
                   shard_index=shard_index, devices_per_run=devices_per_run,
                   dry_run=dry_run, stack=stack, stack_mode=stack_mode)
  if dry_run:
    return rows
  for r in rows:
    logging.info("%s: %s, test accuracy %s", r["variant"], r["status"],
                 r.get("test_accuracy"))
  if report and jax.process_index() == 0:
    from jaxreg import report as report_lib
    path = report_lib.build_report(workdir)
    logging.info("report: %s", path)
  return rows
