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
`xla.KEY=VALUE` (compiler options replacing the trainer's).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

jax = benchlib.jax
jnp = benchlib.jnp
np = benchlib.np
nn = benchlib.nn
norms = benchlib.norms

_STUDY = flags.DEFINE_enum("study", "resnet14", list(benchlib.RESNET_STUDIES),
                           "benchlib.RESNET_STUDIES entry.")
_VARIANTS = flags.DEFINE_multi_string("variant", ["base:"], "NAME:SPEC.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Overrides for all.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per variant per round.")


@norms.register("batch_autodiff", ("momentum", "epsilon"))
class AutodiffBatchNorm(nn.Module):
  """norm=batch as it was before its closed-form backward pass
  (norms.batch_norm_affine): the same forward formula, differentiated by
  JAX. A variant `model.norm=batch_autodiff` compares the two in one
  process (no virtual batches, as S4 and S5)."""
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,)))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,)))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if not train:
      return (x - ra_mean.value) * jnp.reciprocal(
          jnp.sqrt(ra_var.value + self.epsilon)) * scale + bias
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * \
        scale + bias


def build(spec: str, overrides: list[str]):
  """The compiled step of one variant and its arguments."""
  items = [s for s in spec.split(";") if s]
  xla = [s for s in items if s.startswith("xla")]
  config = benchlib.resnet_config(
      _STUDY.value, overrides + [s for s in items if s not in xla])
  batch = config.train.batch_size
  ds = benchlib.synthetic_dataset((28, 28, 1), 10, 16 * batch)
  steps = benchlib.TrainerLoop(config, ds).engine.steps
  if xla:
    opts = {} if "xla=default" in xla else dict(steps.speed.compiler_options)
    for s in xla:
      if s.startswith("xla."):
        k, _, v = s[4:].partition("=")
        opts[k] = v
    steps.speed = dataclasses.replace(steps.speed, compiler_options=opts)
  state = steps.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  compiled, compile_s = steps.compile(state, rng, scan=False)
  d = steps.data
  perm = steps.perm(jax.random.key(0))
  return {"fn": compiled.train, "state": state, "rng": rng, "perm": perm,
          "images": d.train_images, "labels": d.train_labels,
          "compile_s": compile_s, "i": 0}


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
  print("RESULT " + json.dumps({k: benchlib.median(t)
                                for k, t in times.items()}))


if __name__ == "__main__":
  app.run(main)
