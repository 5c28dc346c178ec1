"""Candidate changes to a study's train step, timed side by side.

Each variant is jaxreg's own compiled train step (steps.Steps, as the
trainer builds it) for the study's configuration plus config overrides
and/or replaced XLA compiler options. All variants live in this one process
and run in alternating rounds (every variant `--steps` steps in turn, each
round), so they share the machine's load; printed: the median ms per step
and the median over rounds of each variant's time / the first variant's.

  python bench/step_variants.py --variant='base:' \
      --variant='xla defaults:xla=default' \
      --variant='slices:model.conv_impl=slices'

A variant is 'NAME:SPEC' with SPEC a comma-free list of ';'-separated items:
`key=value` config overrides, `xla=default` (XLA's default options) or
`xla.KEY=VALUE` (compiler options replacing the trainer's), or
`drop=dw|dx|dw+dx` (the convolutions' weight and/or input gradients
replaced by zeros, conv_patches.dropped_conv_gradients: what those passes cost
inside the step, which a profile cannot show) or `conv=torch` (the
convolutions computed by PyTorch's oneDNN kernels through callbacks,
conv_patches.torch_convolutions). The norm
`batch_autodiff` (benchlib.AutodiffBatchNorm) is norm=batch differentiated
by JAX, as it was before its closed-form backward pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import childproc  # pylint: disable=g-import-not-at-top,wrong-import-position
import conv_patches  # pylint: disable=g-import-not-at-top,wrong-import-position

jax = benchlib.jax
np = benchlib.np

_STUDY = flags.DEFINE_enum("study", "resnet14", list(benchlib.RESNET_STUDIES),
                           "benchlib.RESNET_STUDIES entry.")
_VARIANTS = flags.DEFINE_multi_string("variant", ["base:"], "NAME:SPEC.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Overrides for all.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per variant per round.")


def build(spec: str, overrides: list[str]):
  """The compiled step of one variant and its arguments."""
  items = [s for s in spec.split(";") if s]
  xla = [s for s in items if s.startswith("xla")]
  drop = [s[len("drop="):] for s in items if s.startswith("drop=")]
  torch = "conv=torch" in items
  config = benchlib.resnet_config(
      _STUDY.value, overrides + [s for s in items if s not in xla
                                 and not s.startswith(("drop=", "conv="))])
  batch = config.train.batch_size
  ds = benchlib.synthetic_dataset((28, 28, 1), 10, 16 * batch)
  steps = benchlib.TrainerLoop(config, ds).engine.steps
  if xla:
    opts = {} if "xla=default" in xla else dict(steps.speed.compiler_options)
    for s in xla:
      if s.startswith("xla."):
        k, _, v = s[4:].partition("=")
        # XLA refuses the strings "true"/"false" for its bool options.
        opts[k] = {"true": True, "false": False}.get(v, v)
    steps.speed = dataclasses.replace(steps.speed, compiler_options=opts)
  with contextlib.ExitStack() as patches:
    if drop:
      patches.enter_context(conv_patches.dropped_conv_gradients(drop[-1]))
    if torch:
      patches.enter_context(conv_patches.torch_convolutions())
    v = benchlib.compiled_train_step(steps)
  v["fn"] = v.pop("train")
  v["i"] = 0
  return v


def run(v: dict, n: int) -> float:
  """n steps; seconds per step (blocking at the end)."""
  t0 = time.perf_counter()
  for _ in range(n):
    v["state"], _ = v["fn"](v["state"], v["images"], v["labels"], v["perm"],
                            np.int32(v["i"] % 16), v["rng"])
    v["i"] += 1
  jax.block_until_ready(v["state"])
  return (time.perf_counter() - t0) / n


def main(argv):
  del argv
  print(benchlib.environment())
  variants = {}
  for item in _VARIANTS.value:
    name, _, spec = item.partition(":")
    variants[name] = build(spec, _OVERRIDE.value)
    run(variants[name], 2)  # Warm-up.
  load0 = benchlib.load_avg()
  times = {k: [] for k in variants}
  for _ in range(_ROUNDS.value):
    for k, v in variants.items():
      times[k].append(run(v, _STEPS.value))
  load1 = benchlib.load_avg()
  first = next(iter(variants))
  rows = [[k, variants[k]["compile_s"], 1e3 * benchlib.median(t),
           benchlib.median([a / b for a, b in zip(t, times[first])]),
           " ".join(f"{1e3 * x:.0f}" for x in t)] for k, t in times.items()]
  benchlib.print_table(
      ["variant", "compile s", "ms/step", f"vs {first}", "ms per round"],
      rows, f"{_STUDY.value}: train step variants ({_ROUNDS.value} rounds x "
      f"{_STEPS.value} steps, load {load0:.2f} -> {load1:.2f})")
  # For bench/ab.py: seconds per step.
  childproc.print_result({k: benchlib.median(t) for k, t in times.items()})


if __name__ == "__main__":
  app.run(main)
