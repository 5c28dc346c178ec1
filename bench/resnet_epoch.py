"""Benchmark: seconds per epoch of S4's ResNet-14 and S5's ResNet-9, jaxreg
against PyTorch (NCHW and channels_last), on real Fashion-MNIST.

The configurations are benchlib.RESNET_STUDIES':

  resnet14  configs/norms.py with norm=batch (cifar_resnet depth 14, batch
            128, pad-4 crop + flip, SGD momentum 0.9, weight decay 1e-4,
            cosine) on fashion_mnist (54,000 training images after S4's
            validation split: 421 steps per epoch);
  resnet9   configs/resnet9.py (DavidNet, Nesterov, onecycle, pad-4 reflect
            crop + flip + cutout) at batch 32 on fashion_mnist.

Loops, each in its own Python process (one per loop per round, the loops
in turn, so all see similar machine load):

  jaxreg                 train.run_epoch + the engine's epoch totals, the
                         run's own loop, with what launch.py applies;
  PyTorch NCHW           bench/torch_resnet.py, 2 threads, default layout;
  PyTorch channels_last  the same in torch.channels_last.

A process loads the data, compiles (timed apart), runs a first epoch, then
--steady_epochs steady ones. With --steps=N an "epoch" is the first N
batches of the training split (N * batch images; the schedule is built for
that epoch length, which changes no cost): per-step times are
steady-state, so the full epoch is extrapolated as steady seconds per step
x the full split's steps, and the first epoch as that plus the one-time
cost the first fraction showed (its excess over a steady one). --steps=0
times whole epochs.

Reported per model: the median over rounds of compile, first and steady
epoch, images/s, ms/step, page faults per step, and jaxreg / PyTorch's best
(the faster PyTorch layout of the same round), as the median of per-round
ratios; the 1-minute load average before and after.

Usage:
  JAXREG_MANUAL_DIR=../shared/datasets python bench/resnet_epoch.py
  python bench/resnet_epoch.py --models=resnet14 --rounds=3 --steps=60
  python bench/resnet_epoch.py --loops=jaxreg --override=model.conv_impl=xla
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
import torch_resnet  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxreg import hostmem  # pylint: disable=g-import-not-at-top,wrong-import-position

# Loop name -> (JAXREG_HOST_TUNING in its process, channels_last or None
# for jaxreg).
LOOPS = {
    "jaxreg": ("1", None),
    "PyTorch NCHW": ("0", False),
    "PyTorch channels_last": ("0", True),
}
# Steps per timed epoch by default: the whole bench (2 models x 3 loops x
# 2 rounds) fits in about 8 minutes on the 2-core CPU.
DEFAULT_STEPS = {"resnet14": 32, "resnet9": 8}

_MODELS = flags.DEFINE_list("models", list(DEFAULT_STEPS),
                            "benchlib.RESNET_STUDIES entries to time.")
_LOOPS = flags.DEFINE_list("loops", list(LOOPS), "Loops to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; each starts one "
                               "process per loop.")
_EPOCHS = flags.DEFINE_integer("steady_epochs", 2, "Steady epochs timed per "
                               "process, after the first.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Batches per timed epoch (0: whole epochs); default "
    f"{DEFAULT_STEPS}.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Config overrides for the jaxreg loop, key=value.")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Wait (up to --wait_s) for the 1-minute load average "
    "to drop below this before starting.")
_WAIT_S = flags.DEFINE_float("wait_s", 0.0, "Longest wait for a low load.")
_CHILD = flags.DEFINE_string("child", None, "(internal) MODEL/LOOP to time "
                             "in this process.")


def _steps(model: str) -> int:
  return DEFAULT_STEPS[model] if _STEPS.value is None else _STEPS.value


def _child(model: str, name: str) -> dict:
  from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top
  config = benchlib.resnet_config(
      model, _OVERRIDE.value if name == "jaxreg" else ())
  ds = data_lib.load(config.dataset)
  bs = config.train.batch_size
  full_steps = len(ds.train_labels) // bs
  n = _steps(model)
  if n:
    ds = data_lib.Dataset(**{**ds.__dict__,
                             "train_images": ds.train_images[:n * bs],
                             "train_labels": ds.train_labels[:n * bs]})
  out = {"host_tuning": benchlib.HOST_TUNING, "full_steps": full_steps}
  if name == "jaxreg":
    loop = benchlib.TrainerLoop(config, ds)
    speed = loop.engine.steps.speed
    out["note"] = (f"conv_impl={config.model.conv_impl}, XLA options "
                   f"{speed.compiler_options or 'default'}")
  else:
    import torch  # pylint: disable=g-import-not-at-top
    loop = torch_resnet.TorchLoop(config, ds,
                                  channels_last=LOOPS[name][1])
    out["note"] = (f"PyTorch {torch.__version__}, {torch.get_num_threads()} "
                   f"threads, {loop.num_params} params (= jaxreg's)")
  compile_s, first_s, times, faults = benchlib.time_epochs({name: loop},
                                                           _EPOCHS.value)
  steps = loop.steps_per_epoch
  out.update(compile_s=compile_s[name], first_s=first_s[name],
             steady_s=times[name], steps=steps, batch=bs,
             faults_per_step=sum(faults[name]) / (_EPOCHS.value * steps))
  return out


def _run_child(model: str, name: str) -> dict:
  argv = [__file__, f"--child={model}/{name}",
          f"--steady_epochs={_EPOCHS.value}", f"--steps={_steps(model)}"]
  argv += [f"--override={o}" for o in _OVERRIDE.value]
  return childproc.run_script(
      argv, f"{model}/{name} process",
      env={**os.environ, hostmem.ENV_VAR: LOOPS[name][0]})


def _epoch_s(res: dict) -> tuple[float, float]:
  """(steady, first) seconds of a full epoch, extrapolated from the timed
  fraction (module docstring)."""
  steady = benchlib.median(res["steady_s"])
  scale = res["full_steps"] / res["steps"]
  return steady * scale, steady * scale + max(res["first_s"] - steady, 0.0)


def _table(model: str, names: list[str], runs: dict, load0: float,
           load1: float) -> None:
  torch_names = [n for n in names if LOOPS[n][1] is not None]
  ratios = []
  if "jaxreg" in names and torch_names:
    for r in range(_ROUNDS.value):
      best = min(_epoch_s(runs[n][r])[0] for n in torch_names)
      ratios.append(_epoch_s(runs["jaxreg"][r])[0] / best)
  rows = []
  for n in names:
    res = runs[n]
    steady = benchlib.median([_epoch_s(x)[0] for x in res])
    first = benchlib.median([_epoch_s(x)[1] for x in res])
    full, batch = res[0]["full_steps"], res[0]["batch"]
    if n == "jaxreg":
      vs = f"{benchlib.median(ratios):.2f}" if ratios else "-"
    else:
      vs = ""
    rows.append([n, benchlib.median([x["compile_s"] for x in res]), first,
                 steady, full * batch / steady, 1e3 * steady / full, vs,
                 benchlib.median([x["faults_per_step"] for x in res]),
                 " ".join(f"{_epoch_s(x)[0]:.1f}" for x in res)])
  config = benchlib.resnet_config(model)
  n = runs[names[0]][0]["steps"]
  benchlib.print_table(
      ["loop", "compile s", "first epoch s", "steady epoch s", "img/s",
       "ms/step", "jaxreg / PyTorch best", "page faults/step",
       "steady epoch s per round"], rows,
      f"{model}: {config.model.name} on fashion_mnist, batch "
      f"{config.train.batch_size}, {full} steps/epoch (timed: {n} steps x "
      f"{_EPOCHS.value} steady epochs, extrapolated), {_ROUNDS.value} "
      f"rounds, load {load0:.2f} -> {load1:.2f}")
  for n in names:
    print(f"  {n}: {runs[n][0]['note']}; host: {runs[n][0]['host_tuning']}")


def main(argv):
  del argv
  if _CHILD.value:
    model, _, name = _CHILD.value.partition("/")
    childproc.print_result(_child(model, name))
    return
  print(benchlib.environment())
  for n in _LOOPS.value:
    if n not in LOOPS:
      raise app.UsageError(f"--loops: unknown {n!r}; valid: "
                           f"{', '.join(LOOPS)}")
  for m in _MODELS.value:
    if m not in DEFAULT_STEPS:
      raise app.UsageError(f"--models: unknown {m!r}; valid: "
                           f"{', '.join(DEFAULT_STEPS)}")
  names = list(_LOOPS.value)
  if not benchlib.torch_available():
    print(f"PyTorch rows SKIPPED: {benchlib.TORCH_INSTALL_HINT}")
    names = [n for n in names if LOOPS[n][1] is None]
  result = {}
  for model in _MODELS.value:
    load0 = benchlib.wait_for_quiet(_MAX_LOAD.value, _WAIT_S.value)
    runs = {n: [] for n in names}
    for r in range(_ROUNDS.value):
      for n in names:
        res = _run_child(model, n)
        runs[n].append(res)
        print(f"{model} round {r + 1} {n}: steady {res['steady_s']} s for "
              f"{res['steps']} steps, first {res['first_s']:.1f} s, compile "
              f"{res['compile_s']:.1f} s, load {benchlib.load_avg():.2f}",
              flush=True)
    _table(model, names, runs, load0, benchlib.load_avg())
    result.update({f"{model}/{n}": benchlib.median(
        [_epoch_s(x)[0] for x in runs[n]]) for n in names})
  # For bench/ab.py: steady epoch seconds.
  childproc.print_result(result)


if __name__ == "__main__":
  app.run(main)
