"""Benchmark: K stacked S3 variants against K sequential runs.

K variants of the S3 recipe (configs/l1_l2.py: MNIST CNN, BatchNorm, dropout
0.05, SGD momentum 0.9, L1 1e-4) that differ in learning rate, weight decay
and seed are trained (a) one after another with train.train_and_evaluate,
as a sweep without --stack does, and (b) as one stacked group
(stacked.train_group) in each requested mode. Each is repeated and the
median reported: wall time in total (data, build, compile, train, eval,
files), compile time, and training seconds per epoch for all K variants
(sequential: the K runs' epoch times summed; stacked: the group's).

No persistent compilation cache is used, so every sequential run compiles
its own step, as the first sweep on a machine does; launch.py turns one on,
after which sequential runs 2..K load the step instead (compare "train s per
epoch" and "total - compile" for that case).

Usage (CPU defaults are a reduced S3; the issue's target is the full one on
a GPU):
  python bench/stacked.py                            # K=8, 3200 images, 2 epochs
  python bench/stacked.py --train_size=0 --test_size=0 --epochs=20  # full S3
  python bench/stacked.py --modes=vmap --repeats=1
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_K = flags.DEFINE_integer("k", 8, "Number of variants.")
_TRAIN_SIZE = flags.DEFINE_integer(
    "train_size", 3200, "Training images (0 = all 60000).")
_TEST_SIZE = flags.DEFINE_integer("test_size", 2000,
                                  "Test images (0 = all 10000).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs per run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats; the median is shown.")
_MODES = flags.DEFINE_list("modes", ["loop", "vmap"],
                           "Stacked modes to time (loop, vmap, auto).")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Before each measurement, wait (up to --wait_s) for the "
    "1-minute load average to drop below this.")
_WAIT_S = flags.DEFINE_float("wait_s", 120.0, "Longest wait for a low load.")


def _load() -> float:
  return os.getloadavg()[0]


def _wait_for_quiet() -> float:
  deadline = time.time() + _WAIT_S.value
  while _load() >= _MAX_LOAD.value and time.time() < deadline:
    time.sleep(5)
  return _load()


def variants(k: int) -> list[dict]:
  """K S3 variants: lr x weight decay x seed."""
  lrs = (0.02, 0.04, 0.06, 0.08)
  wds = (5e-4, 1e-3)
  return [{"optimizer.lr": lrs[i % len(lrs)],
           "optimizer.weight_decay": wds[(i // len(lrs)) % len(wds)],
           "seed": i} for i in range(k)]


def configs(k: int):
  from jaxreg import config as config_lib
  module, _ = config_lib.load_config_file(str(ROOT / "configs" / "l1_l2.py"))
  base = module.get_config(None)
  base = config_lib.apply_overrides(base, {
      "optimizer.l1": 1e-4, "dataset.train_size": _TRAIN_SIZE.value,
      "dataset.test_size": _TEST_SIZE.value, "train.epochs": _EPOCHS.value,
      "train.log_every_s": 0.0})
  return [config_lib.apply_overrides(base, v) for v in variants(k)]


def _epoch_train_s(run_dir: Path) -> float:
  from jaxreg import results
  rows = results.read_jsonl(run_dir / "metrics.jsonl")
  return sum(r["epoch_time_s"] for r in rows) / len(rows)


def time_sequential(cfgs, root: Path) -> dict:
  from jaxreg import train
  t0 = time.perf_counter()
  sums = [train.train_and_evaluate(c, root / f"v{j}")
          for j, c in enumerate(cfgs)]
  total = time.perf_counter() - t0
  assert all(s["status"] == "completed" for s in sums), sums
  return {"total_s": total,
          "compile_s": sum(s["compile_time_s"] for s in sums),
          "epoch_s": sum(_epoch_train_s(root / f"v{j}")
                         for j in range(len(cfgs))),
          "acc": [s["test_accuracy"] for s in sums]}


def time_stacked(cfgs, root: Path, mode: str) -> dict:
  from jaxreg import stacked
  t0 = time.perf_counter()
  sums = stacked.train_group(cfgs, [root / f"v{j}" for j in range(len(cfgs))],
                             root / "stack", mode=mode)
  total = time.perf_counter() - t0
  assert all(s["status"] == "completed" for s in sums), sums
  return {"total_s": total, "compile_s": sums[0]["compile_time_s"],
          "epoch_s": _epoch_train_s(root / "v0"),
          "acc": [s["test_accuracy"] for s in sums]}


def main(argv):
  del argv
  os.environ.setdefault("JAXREG_MANUAL_DIR",
                        str(ROOT.parent / "shared" / "datasets"))
  from jaxreg import hostmem
  host = hostmem.tune()  # As launch.py, before JAX starts its backend.
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from jaxreg import stacked
  for m in _MODES.value:
    stacked.MODES.get(m)
  cfgs = configs(_K.value)
  from jaxreg import data as data_lib
  data_lib.load(cfgs[0].dataset)  # Prepared once, outside the timings.
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs; K={_K.value} S3 variants, "
        f"{_TRAIN_SIZE.value or 60000} train / {_TEST_SIZE.value or 10000} "
        f"test images, {_EPOCHS.value} epochs, median of {_REPEATS.value}; "
        f"host settings {host}")
  kinds = ["sequential"] + [f"stacked-{m}" for m in _MODES.value]
  runs: dict[str, list[dict]] = {k: [] for k in kinds}
  for rep in range(_REPEATS.value):
    for kind in kinds:
      load = _wait_for_quiet()
      root = Path(tempfile.mkdtemp(prefix="bench_stacked_"))
      try:
        if kind == "sequential":
          r = time_sequential(cfgs, root)
        else:
          r = time_stacked(cfgs, root, kind.split("-", 1)[1])
      finally:
        shutil.rmtree(root, ignore_errors=True)
      r["load"] = load
      runs[kind].append(r)
      print(f"  repeat {rep + 1} {kind:<14} load {load:4.2f}: total "
            f"{r['total_s']:7.1f}s, compile {r['compile_s']:6.1f}s, "
            f"train {r['epoch_s']:6.1f}s/epoch", flush=True)
  med = {k: {f: statistics.median(r[f] for r in v)
             for f in ("total_s", "compile_s", "epoch_s", "load")}
         for k, v in runs.items()}
  seq = med["sequential"]
  print()
  print(f"| {'':<16} | {'total s':>8} | {'compile s':>9} | "
        f"{'train s/epoch (all K)':>21} | {'speed-up total':>14} | "
        f"{'speed-up/epoch':>14} | {'load':>5} |")
  print(f"|{'-' * 18}|{'-' * 9}:|{'-' * 10}:|{'-' * 22}:|{'-' * 15}:|"
        f"{'-' * 15}:|{'-' * 6}:|")
  for kind in kinds:
    m = med[kind]
    print(f"| {kind:<16} | {m['total_s']:8.1f} | {m['compile_s']:9.1f} | "
          f"{m['epoch_s']:21.2f} | {seq['total_s'] / m['total_s']:13.2f}x | "
          f"{seq['epoch_s'] / m['epoch_s']:13.2f}x | {m['load']:5.2f} |")
  for kind in kinds[1:]:
    # Same numbers as the separate runs (loop: exactly; vmap: tolerance).
    diffs = [abs(a - b) for a, b in zip(runs[kind][0]["acc"],
                                        runs["sequential"][0]["acc"])]
    print(f"{kind}: max |test accuracy - sequential| = {max(diffs):.4f}")


if __name__ == "__main__":
  app.run(main)
