"""Benchmark: seconds per MNIST epoch of study S3's configuration.

configs/mnist.py (MNIST CNN, BatchNorm, dropout 0.05, batch 128, SGD lr 0.04
momentum 0.9) on the real 60,000 training images, timed three ways in one
process, epoch by epoch in turn so that all see the same machine load:

  jaxreg     train._Trainer.train_epoch + epoch_totals, the run's own loop
             with the platform's default options (bench/README.md);
  PyTorch    bench/torch_mnist.py: the same network in plain PyTorch, a
             DataLoader over in-memory tensors (skipped if torch is absent);
  bare       with --naive: a hand-written jitted Flax loop with JAX's
             defaults (threefry2x32 dropout keys, default XLA options).

"first epoch" excludes compilation (reported apart); "steady epoch" is the
median of --repeats later epochs. A second table compares an epoch as one
compiled lax.scan (config.train.scan_epoch=True) with the Python loop over
a jitted step, on the first --scan_steps steps' worth of images (the ratio
is what train.SCAN_EPOCH_DEFAULT is chosen from; seconds are scaled to the
full epoch).

Usage:
  JAXREG_MANUAL_DIR=../shared/datasets python bench/mnist_epoch.py
  python bench/mnist_epoch.py --repeats=3 --naive --scan_steps=0
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxreg import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPEATS = flags.DEFINE_integer("repeats", 3, "Steady epochs timed per loop.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch twin.")
_NAIVE = flags.DEFINE_bool("naive", False, "Time a bare jitted Flax loop "
                           "with JAX's defaults too.")
_SCAN_STEPS = flags.DEFINE_integer(
    "scan_steps", 32, "Steps per epoch of the scan-vs-loop comparison "
    "(0 = skip it).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Config overrides for the jaxreg loop, key=value "
    "(e.g. train.compute_dtype=bfloat16).")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Wait (up to --wait_s) for the 1-minute load average "
    "to drop below this before starting.")
_WAIT_S = flags.DEFINE_float("wait_s", 0.0, "Longest wait for a low load.")


def _config(overrides=()):
  config = benchlib.mnist_config()
  for kv in overrides:
    key, _, value = kv.partition("=")
    config = config_lib.apply_overrides(
        config, {key: config_lib.parse_value(value)})
  return config


def _pause() -> None:
  # Lets PyTorch's OpenMP workers stop spinning before the next loop runs.
  time.sleep(1.0)


def main(argv):
  del argv
  print(benchlib.environment())
  config = _config(_OVERRIDES.value)
  ds = data_lib.load(config.dataset)
  loops = {"jaxreg": benchlib.TrainerLoop(config, ds)}
  note = (f"jaxreg: rng_impl={config.train.rng_impl}, compute_dtype="
          f"{config.train.compute_dtype}, scan_epoch="
          f"{loops['jaxreg'].trainer.scan_epoch}, XLA options "
          f"{loops['jaxreg'].trainer.compiler_options or 'default'}")
  if _TORCH.value:
    if torch_mnist.available():
      import torch  # pylint: disable=g-import-not-at-top
      loops["PyTorch"] = torch_mnist.TorchLoop(config, ds)
      note += (f"; PyTorch {torch.__version__}, {torch.get_num_threads()} "
               f"threads, {loops['PyTorch'].num_params} params (= jaxreg's)")
    else:
      print(f"PyTorch rows SKIPPED: {torch_mnist.INSTALL_HINT}")
  if _NAIVE.value:
    loops["bare (JAX defaults)"] = benchlib.BareLoop(config, ds, None, {})
  print(note)

  load0 = benchlib.wait_for_quiet(_MAX_LOAD.value, _WAIT_S.value)
  compile_s, first_s, times = benchlib.time_epochs(
      loops, _REPEATS.value, between=_pause)
  load1 = benchlib.load_avg()
  images = loops["jaxreg"].steps_per_epoch * config.train.batch_size
  rows = []
  for name in loops:
    steady = benchlib.median(times[name])
    rows.append([name, compile_s[name], first_s[name], steady,
                 images / steady, " ".join(f"{t:.1f}" for t in times[name])])
  if "PyTorch" in loops:
    ratio = benchlib.median([a / b for a, b in zip(times["jaxreg"],
                                                   times["PyTorch"])])
    print(f"jaxreg / PyTorch steady epoch time (median of per-round "
          f"ratios): {ratio:.2f}")
  benchlib.print_table(
      ["loop", "compile s", "first epoch s", "steady epoch s", "img/s",
       "steady epochs s"], rows,
      f"S3 (configs/mnist.py) on MNIST, {images} images/epoch, load "
      f"{load0:.2f} -> {load1:.2f}")

  if _SCAN_STEPS.value:
    n = _SCAN_STEPS.value * config.train.batch_size
    sub = data_lib.Dataset(**{**ds.__dict__,
                              "train_images": ds.train_images[:n],
                              "train_labels": ds.train_labels[:n]})
    scan_loops = {
        "Python loop": benchlib.TrainerLoop(
            config_lib.apply_overrides(config, {"train.scan_epoch": False}),
            sub),
        "lax.scan": benchlib.TrainerLoop(
            config_lib.apply_overrides(config, {"train.scan_epoch": True}),
            sub)}
    load0 = benchlib.load_avg()
    compile_s, first_s, times = benchlib.time_epochs(scan_loops,
                                                     _REPEATS.value)
    load1 = benchlib.load_avg()
    scale = loops["jaxreg"].steps_per_epoch / _SCAN_STEPS.value
    base = benchlib.median(times["Python loop"])
    benchlib.print_table(
        ["epoch as", "compile s", "ms/step", "epoch s (scaled)",
         "vs Python loop"],
        [[name, compile_s[name],
          1e3 * benchlib.median(t) / _SCAN_STEPS.value,
          scale * benchlib.median(t), f"{benchlib.median(t) / base:.2f}x"]
         for name, t in times.items()],
        f"Epoch as one lax.scan vs a Python loop over a jitted step "
        f"({_SCAN_STEPS.value}-step epochs, load {load0:.2f} -> {load1:.2f})")


if __name__ == "__main__":
  app.run(main)
