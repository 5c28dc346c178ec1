"""Benchmark: seconds per MNIST epoch of study S3's configuration.

configs/mnist.py (MNIST CNN, BatchNorm, dropout 0.05, batch 128, SGD lr 0.04
momentum 0.9) on the real 60,000 training images. Each loop runs in its own
Python process, because jaxreg's host settings (jaxreg/hostmem.py: glibc
malloc thresholds, CPU steps on the calling thread) are process-wide and
would speed up PyTorch too:

  jaxreg                 train.run_epoch + the engine's epoch totals, the
                         run's own loop, with what launch.py applies;
  jaxreg, host defaults  the same with JAXREG_HOST_TUNING=0 (glibc's and
                         JAX's defaults);
  PyTorch                bench/torch_mnist.py: the same network in plain
                         PyTorch, a DataLoader over in-memory tensors, in a
                         plain process (skipped if torch is absent);
  PyTorch + hostmem      the same after jaxreg.hostmem.tune(), to show
                         what the malloc settings alone do for PyTorch;
  bare (JAX defaults)    a hand-written jitted Flax loop with JAX's defaults
                         (threefry2x32 dropout keys, default XLA options,
                         host defaults).

Every round starts one process per loop in turn (so all see similar machine
load); a process compiles (timed apart), runs a first epoch, then
--steady_epochs steady epochs. Reported: the median of each loop's steady
epochs over all rounds, the minor page faults per step, and jaxreg / PyTorch
as the median of per-round ratios. A second table, in one more process with
jaxreg's settings, compares an epoch as one compiled lax.scan
(train.scan_epoch) with the Python loop over a jitted step on the first
--scan_steps steps, the two run in turn.

Usage:
  JAXREG_MANUAL_DIR=../shared/datasets python bench/mnist_epoch.py
  python bench/mnist_epoch.py --rounds=3 --loops=jaxreg,PyTorch --scan_steps=0
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import childproc  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxreg import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxreg import hostmem  # pylint: disable=g-import-not-at-top,wrong-import-position

# Loop name -> (JAXREG_HOST_TUNING in its process, needs torch).
LOOPS = {
    "jaxreg": ("1", False),
    "jaxreg, host defaults": ("0", False),
    "PyTorch": ("0", True),
    "PyTorch + hostmem": ("1", True),
    "bare (JAX defaults)": ("0", False),
}

_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; each starts one "
                               "process per loop.")
_EPOCHS = flags.DEFINE_integer("steady_epochs", 1, "Steady epochs timed per "
                               "process, after the first.")
_LOOPS = flags.DEFINE_list("loops", list(LOOPS), "Loops to time.")
_SCAN_STEPS = flags.DEFINE_integer(
    "scan_steps", 32, "Steps per epoch of the scan-vs-loop comparison "
    "(0 = skip it).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Config overrides for the jaxreg loops, key=value "
    "(e.g. train.compute_dtype=bfloat16).")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Wait (up to --wait_s) for the 1-minute load average "
    "to drop below this before starting.")
_WAIT_S = flags.DEFINE_float("wait_s", 0.0, "Longest wait for a low load.")
_CHILD = flags.DEFINE_string("child", None, "(internal) time this loop in "
                             "this process and print its result.")


def _config(overrides=()):
  return benchlib.with_overrides(benchlib.mnist_config(), overrides)


def _timed(loops: dict, epochs: int) -> dict:
  """benchlib.time_epochs of `loops` as {name: JSON-able result}."""
  compile_s, first_s, times, faults = benchlib.time_epochs(loops, epochs)
  return {name: {"compile_s": compile_s[name], "first_s": first_s[name],
                 "steady_s": times[name],
                 "faults_per_step": sum(faults[name]) / (
                     epochs * loop.steps_per_epoch),
                 "images": loop.steps_per_epoch * loop.batch_size}
          for name, loop in loops.items()}


def _child(name: str) -> dict:
  from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top
  config = _config(_OVERRIDES.value if name.startswith("jaxreg")
                   or name == "scan" else ())
  ds = data_lib.load(config.dataset)
  # benchlib applied hostmem.tune() on import, reading JAXREG_HOST_TUNING
  # as the parent set it for this loop.
  out = {"host_tuning": benchlib.HOST_TUNING}
  if name.startswith("jaxreg"):
    loop = benchlib.TrainerLoop(config, ds)
    speed = loop.engine.steps.speed
    out["note"] = (f"rng_impl={config.train.rng_impl}, compute_dtype="
                   f"{config.train.compute_dtype}, scan_epoch="
                   f"{speed.scan_epoch}, XLA options "
                   f"{speed.compiler_options or 'default'}")
  elif name.startswith("PyTorch"):
    import torch  # pylint: disable=g-import-not-at-top
    loop = torch_mnist.TorchLoop(config, ds)
    out["note"] = (f"PyTorch {torch.__version__}, {torch.get_num_threads()} "
                   f"threads, {loop.num_params} params (= jaxreg's)")
  elif name == "bare (JAX defaults)":
    loop = benchlib.BareLoop(config, ds, None, {})
    out["note"] = "threefry2x32 dropout keys, XLA's default options"
  elif name == "scan":
    return {**out, **_scan(config, ds)}
  else:
    raise ValueError(f"unknown loop {name!r}; valid: {', '.join(LOOPS)}")
  out.update(_timed({name: loop}, _EPOCHS.value)[name])
  return out


def _scan(config, ds) -> dict:
  from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top
  n = _SCAN_STEPS.value * config.train.batch_size
  sub = data_lib.Dataset(**{**ds.__dict__,
                            "train_images": ds.train_images[:n],
                            "train_labels": ds.train_labels[:n]})
  loops = {name: benchlib.TrainerLoop(
      config_lib.apply_overrides(config, {"train.scan_epoch": scan}), sub)
           for name, scan in (("Python loop", False), ("lax.scan", True))}
  return {"scan": _timed(loops, max(_EPOCHS.value, 2))}


def _run_child(name: str) -> dict:
  tuning = LOOPS[name][0] if name in LOOPS else "1"
  argv = [__file__, f"--child={name}",
          f"--steady_epochs={_EPOCHS.value}",
          f"--scan_steps={_SCAN_STEPS.value}"]
  argv += [f"--override={o}" for o in _OVERRIDES.value]
  return childproc.run_script(argv, f"{name} process",
                              env={**os.environ, hostmem.ENV_VAR: tuning})


def main(argv):
  del argv
  if _CHILD.value:
    childproc.print_result(_child(_CHILD.value))
    return
  print(benchlib.environment())
  names = list(_LOOPS.value)
  for n in names:
    if n not in LOOPS:
      raise app.UsageError(f"--loops: unknown {n!r}; valid: "
                           f"{', '.join(LOOPS)}")
  if not benchlib.torch_available():
    print(f"PyTorch rows SKIPPED: {benchlib.TORCH_INSTALL_HINT}")
    names = [n for n in names if not LOOPS[n][1]]

  load0 = benchlib.wait_for_quiet(_MAX_LOAD.value, _WAIT_S.value)
  runs = {n: [] for n in names}
  for r in range(_ROUNDS.value):
    for n in names:
      res = _run_child(n)
      runs[n].append(res)
      print(f"round {r + 1} {n}: steady {res['steady_s']} s, first "
            f"{res['first_s']:.1f} s, compile {res['compile_s']:.1f} s, "
            f"{res['faults_per_step']:.0f} page faults/step, load "
            f"{benchlib.load_avg():.2f}", flush=True)
  load1 = benchlib.load_avg()
  for n in names:
    print(f"{n}: {runs[n][0]['note']}; host: {runs[n][0]['host_tuning']}")
  images = runs[names[0]][0]["images"]
  rows = []
  for n in names:
    steady = [t for res in runs[n] for t in res["steady_s"]]
    med = benchlib.median(steady)
    rows.append([n, benchlib.median([x["compile_s"] for x in runs[n]]),
                 benchlib.median([x["first_s"] for x in runs[n]]), med,
                 images / med,
                 benchlib.median([x["faults_per_step"] for x in runs[n]]),
                 " ".join(f"{t:.1f}" for t in steady)])
  if "jaxreg" in runs and "PyTorch" in runs:
    ratio = benchlib.median([
        benchlib.median(a["steady_s"]) / benchlib.median(b["steady_s"])
        for a, b in zip(runs["jaxreg"], runs["PyTorch"])])
    print(f"jaxreg / PyTorch steady epoch time (median of per-round "
          f"ratios): {ratio:.2f}")
  benchlib.print_table(
      ["loop", "compile s", "first epoch s", "steady epoch s", "img/s",
       "page faults/step", "steady epochs s"], rows,
      f"S3 (configs/mnist.py) on MNIST, {images} images/epoch, "
      f"{_ROUNDS.value} rounds, load {load0:.2f} -> {load1:.2f}")

  # For bench/ab.py: steady epoch seconds.
  childproc.print_result(
      {n: benchlib.median([t for res in runs[n] for t in res["steady_s"]])
       for n in names})

  if _SCAN_STEPS.value:
    load0 = benchlib.load_avg()
    res = _run_child("scan")["scan"]
    load1 = benchlib.load_avg()
    steps = _SCAN_STEPS.value
    scale = images / res["Python loop"]["images"]
    base = benchlib.median(res["Python loop"]["steady_s"])
    benchlib.print_table(
        ["epoch as", "compile s", "ms/step", "epoch s (scaled)",
         "vs Python loop"],
        [[name, r["compile_s"], 1e3 * benchlib.median(r["steady_s"]) / steps,
          scale * benchlib.median(r["steady_s"]),
          f"{benchlib.median(r['steady_s']) / base:.2f}x"]
         for name, r in res.items()],
        f"Epoch as one lax.scan vs a Python loop over a jitted step "
        f"({steps}-step epochs, jaxreg's settings, load {load0:.2f} -> "
        f"{load1:.2f})")


if __name__ == "__main__":
  app.run(main)
