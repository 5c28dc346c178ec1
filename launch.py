"""Runs a study: `python launch.py --config=configs/<study>.py[:arg]`.

Flags only; everything else lives in jaxreg. Override any config field as
`--config.optimizer.lr=0.1`; a misspelled field is an error.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxreg import launch

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
_REPORT = flags.DEFINE_bool(
    "report", True, "Write <workdir>/report.md and figures at the end.")

flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.main(
      config_flags.get_config_filename(flags.FLAGS["config"]),
      overrides=config_flags.get_override_values(flags.FLAGS["config"]),
      workdir=_WORKDIR.value, dry_run=_DRY_RUN.value,
      variants=_VARIANTS.value, num_shards=_NUM_SHARDS.value,
      shard_index=_SHARD_INDEX.value, devices_per_run=_DEVICES_PER_RUN.value,
      distributed=_DISTRIBUTED.value, report=_REPORT.value,
      stack=_STACK.value, stack_mode=_STACK_MODE.value)


if __name__ == "__main__":
  app.run(main)
