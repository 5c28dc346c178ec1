"""Benchmark: framework overhead against a bare jitted Flax loop, per model.

For each model, the trainer's own epoch (train.run_epoch, then
epoch_totals) and a hand-written jitted loop of the same model, batch and
data path (bench/benchlib.BareLoop) train on random images of the model's
input shape. Both use the trainer's resolved speed options (step PRNG and
XLA:CPU options), so their difference is what the framework adds: the
optimizer chain built from the config, augmentation and metrics plumbing,
the Python epoch loop. A third loop, "bare (JAX defaults)", is the same
hand-written loop with threefry2x32 dropout keys and XLA's default options:
what the speed work in train.py buys over a naive loop. All three run in
this one process with jaxreg's host settings (jaxreg/hostmem.py, printed
first; bench/mnist_epoch.py times the S3 epoch with and without them).

Printed per model: images/s of each loop (median over rounds that run the
loops in turn, so they share the machine's load), the overhead (median over
rounds of trainer time / bare time - 1) and compile seconds (no persistent
cache: a cold compile).

Usage:
  python bench/overhead.py                       # all models, ~4 min on 2 CPUs
  python bench/overhead.py --models=mnist_cnn --repeats=5
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxreg import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxreg import steps as steps_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> (input shape, batch, steps per timed epoch, config overrides). The
# S3 row is configs/mnist.py itself; the CIFAR models use small batches and
# few steps so that the whole table takes minutes on a 2-core CPU.
MODELS = {
    "mnist_cnn": ((28, 28, 1), 128, 40, None),
    "cifar_resnet": ((32, 32, 3), 128, 8, {}),
    "resnet9": ((32, 32, 3), 32, 4, {}),
    "resnet50": ((32, 32, 3), 16, 3, {}),
    "nf_resnet": ((32, 32, 3), 16, 3, {}),
}

_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds; medians shown.")
_NAIVE = flags.DEFINE_bool("naive", True,
                           "Also time the bare loop with JAX's defaults.")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Before each model, wait (up to --wait_s) for the "
    "1-minute load average to drop below this.")
_WAIT_S = flags.DEFINE_float("wait_s", 0.0, "Longest wait for a low load.")


def _config(name: str):
  shape, batch, _, overrides = MODELS[name]
  if overrides is None:  # S3: the study's own configuration.
    return benchlib.mnist_config()
  c = config_lib.base_config()
  c.model.name = name
  c.train.batch_size = batch
  c.optimizer.lr = 0.04
  return config_lib.apply_overrides(c, overrides)


def main(argv):
  del argv
  for name in _MODELS.value:
    if name not in MODELS:
      raise app.UsageError(f"unknown model {name!r}; valid choices: "
                           f"{', '.join(MODELS)}")
  print(benchlib.environment())
  rows = []
  for name in _MODELS.value:
    shape, _, steps, _ = MODELS[name]
    config = _config(name)
    batch = config.train.batch_size
    ds = benchlib.synthetic_dataset(shape, 10, steps * batch)
    t = config.train
    speed = steps_lib.speed_options(t, benchlib.jax.devices()[0].platform)
    rng_impl, options = speed.rng_impl, speed.compiler_options
    loops = {"trainer": benchlib.TrainerLoop(config, ds),
             "bare": benchlib.BareLoop(config, ds, rng_impl, options)}
    if _NAIVE.value:
      loops["naive"] = benchlib.BareLoop(config, ds, None, {})
    load0 = benchlib.wait_for_quiet(_MAX_LOAD.value, _WAIT_S.value)
    compile_s, _, times, _ = benchlib.time_epochs(loops, _REPEATS.value)
    load1 = benchlib.load_avg()
    ips = {k: steps * batch / benchlib.median(v) for k, v in times.items()}
    overhead = benchlib.median(
        [a / b - 1 for a, b in zip(times["trainer"], times["bare"])])
    row = [name, batch, ips["trainer"], ips["bare"], f"{100 * overhead:+.1f}%",
           compile_s["trainer"], compile_s["bare"]]
    if _NAIVE.value:
      row[4:4] = [ips["naive"]]
      row.append(compile_s["naive"])
    row.append(f"{load0:.2f}-{load1:.2f}")
    rows.append(row)
    print(f"{name}: done", file=sys.stderr)
  header = ["model", "batch", "jaxreg img/s", "bare img/s", "overhead",
            "jaxreg compile s", "bare compile s"]
  if _NAIVE.value:
    header[4:4] = ["bare (JAX defaults) img/s"]
    header.append("bare (JAX defaults) compile s")
  header.append("load 1-min")
  benchlib.print_table(
      header, rows, f"Train step: jaxreg vs a bare jitted Flax loop "
      f"(median of {_REPEATS.value} rounds)")


if __name__ == "__main__":
  app.run(main)
