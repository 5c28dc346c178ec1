"""The run loop, once: K members trained together; a single run is K = 1.

`train_and_evaluate(config, workdir)` trains one config into its run
directory (layout in results.py). Underneath, every run is a `Plan`: the
members still to train (each with its own config, seed and run directory),
the config their steps are built from, where their checkpoint lives and
which engine steps them (engine.py). `run(plan)` is the loop: build the data
on the devices and the steps, init, compile, restore, then epochs of steps
with evaluation, per-member records (record.py), checkpoints
(checkpoint.py) and stop signals. stacked.py forms plans of several members;
sweep.py builds and runs the plans of a study.

Interruptions: a run killed at any moment and relaunched with the same
command resumes from its latest checkpoint and ends with the numbers of an
uninterrupted run, bit for bit on CPU, because everything random is a
function of (seed, epoch, global step) (steps.py). On GPU that needs
XLA_FLAGS=--xla_gpu_deterministic_ops=true. SIGTERM or SIGINT finishes the
current step, saves a checkpoint there (inside the epoch if need be), leaves
status "running" and raises checkpoint.Interrupted (a SystemExit with code
143 or 130).

Divergence: a member whose epoch's training loss is NaN or infinite stops
with status "diverged" (its last epoch not recorded); the others go on.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxreg import checkpoint
from jaxreg import data as data_lib
from jaxreg import engine as engine_lib
from jaxreg import optim
from jaxreg import record as record_lib
from jaxreg import results
from jaxreg import runtime
from jaxreg import steps as steps_lib
from jaxreg import validation
from jaxreg import writers as writers_lib


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of a run: its resolved config and where its files go."""
  config: ml_collections.ConfigDict
  run_dir: Path
  variant: str | None = None
  overrides: dict | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked run of K members, ready for `run`.

  Attributes:
    config: the config the data, model, optimizer chain and steps are
      built from (a single run's own; a stacked group's shared one).
    members: the members to train, in order.
    checkpoint_dir: the run's checkpoints (a single run's
      `<run dir>/checkpoints`, a group's under the sweep's .stacks/).
    mode: the engine, "loop" or "vmap" (engine.py).
    hyperparams: each member's values of the optimizer's injected
      hyperparameters, when members differ in them; None for a single run.
    dropout_keeps: each member's dropout keep probabilities, when members
      differ in their dropout rates; None otherwise.
    stack: the "stack" entry of each member's summary (group id, mode,
      size, member names); None for a single run.
  """
  config: ml_collections.ConfigDict
  members: Sequence[Member]
  checkpoint_dir: Path
  mode: str = "loop"
  hyperparams: Sequence[dict] | None = None
  dropout_keeps: Sequence[dict] | None = None
  stack: dict | None = None


def single_plan(config: ml_collections.ConfigDict, run_dir: str | os.PathLike,
                *, variant: str | None = None,
                overrides: dict | None = None) -> Plan:
  """The plan of a run of its own (K = 1); checks nothing."""
  run_dir = Path(run_dir)
  return Plan(config=config,
              members=[Member(config, run_dir, variant, overrides)],
              checkpoint_dir=run_dir / record_lib.CHECKPOINT_DIR)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike, *,
                       variant: str | None = None,
                       overrides: dict | None = None) -> dict:
  """Trains one configuration and writes its run directory.

  Returns the summary (also written to `workdir/summary.json`). A failure
  during training is recorded there with status "failed" and re-raised; a
  NaN/inf loss stops the run with status "diverged" and returns normally.

  Resuming is automatic: on a run directory holding checkpoints, training
  continues from the latest intact one; a completed or diverged run is
  returned as it is (record.check_prior).

  Raises:
    ValueError: a bad config (validation.validate), before any file is
      written; results.ConfigMismatch (a ValueError) for a run directory of
      another config.
    checkpoint.Interrupted: on SIGTERM/SIGINT, after saving a checkpoint.
  """
  runtime.setup()
  validation.validate(config)
  prior = record_lib.check_prior(config, workdir)
  if prior.kind == "finished":
    logging.info("%s: already %s, not retrained", workdir,
                 prior.summary["status"])
    return prior.summary
  return run(single_plan(config, workdir, variant=variant,
                         overrides=overrides))[0]


def run(plan: Plan) -> list[dict]:
  """Trains `plan`'s members together; returns their summaries.

  Any failure marks every member still training "failed" and is re-raised;
  an interruption leaves them "running" (a relaunch resumes). The previous
  signal handlers are restored on return.
  """
  # Several processes train one run: process 0 writes its files, all of
  # them write and read its checkpoints, so they must mean the same place.
  runtime.agree("the run directory", "\n".join(
      str(m.run_dir.absolute()) for m in plan.members))
  records = [record_lib.RunRecord(m.run_dir, m.config, variant=m.variant,
                                  overrides=m.overrides, stack=plan.stack)
             for m in plan.members]
  writers = [writers_lib.MetricWriter(
      m.run_dir, tensorboard=m.config.train.tensorboard,
      hparams=m.overrides) for m in plan.members]
  env = results.environment()
  for r in records:
    r.start(env)
  try:
    with checkpoint.StopSignals() as stop:
      _loop(plan, records, writers, stop)
  except (KeyboardInterrupt, SystemExit) as e:
    for r in records:
      if r.summary["status"] == "running":
        r.write()
    if isinstance(e, checkpoint.Interrupted):
      logging.warning("%s: %s", plan.checkpoint_dir.parent, e)
    raise
  except BaseException as e:
    lost = runtime.process_lost(e)
    for r in records:
      if r.summary["status"] == "running":
        r.failed(lost or e)
    if lost is not None:
      logging.error("%s: %s", plan.checkpoint_dir.parent, lost)
      raise lost from e
    raise
  finally:
    for w in writers:
      w.close()
  return [r.summary for r in records]


def format_progress(epoch: int, epochs: int, row: dict, eta_s: float) -> str:
  """One line per epoch: losses, accuracies, time, throughput, ETA."""
  parts = [f"epoch {epoch}/{epochs}",
           f"train loss {row['train_loss']:.4f} acc "
           f"{100 * row['train_accuracy']:.2f}%"]
  for split in ("val", "test"):
    if f"{split}_loss" in row:
      parts.append(f"{split} loss {row[f'{split}_loss']:.4f} "
                   f"acc {100 * row[f'{split}_accuracy']:.2f}%")
  parts.append(f"{row['epoch_time_s']:.1f}s ({row['images_per_s']:.0f} img/s)")
  parts.append(f"ETA {eta_s:.0f}s")
  return " | ".join(parts)


def run_epoch(engine: engine_lib.LoopEngine, states: Any, epoch: int,
              epochs: int, *, start: int = 0, step_metrics: Sequence = (),
              active: Sequence[bool] | None = None,
              should_stop: Callable[[int], Any] | None = None,
              log_every_s: float = 0.0,
              after_step: Callable[[int, Any, list], None] | None = None
              ) -> tuple[Any, list, int]:
  """Runs steps `start`, `start + 1`, ... of (1-based) `epoch`.

  Returns (states, the epoch's step metrics so far, steps done). Fewer than
  steps_per_epoch steps are done when `should_stop(global step)` is true
  before one. `step_metrics` are those of the steps before `start` (from a
  checkpoint), so a resumed epoch sums the same numbers in the same order as
  an uninterrupted one. `after_step(i, states, step_metrics)` is called
  after step i (0-based, in the epoch; a scanned epoch: once, with the
  last). Where the engine scans (SpeedOptions.scan_epoch), a
  whole epoch is one call (no progress lines, and a stop request waits for
  the epoch's end); a resumed epoch that starts mid-way runs its remaining
  steps one by one.
  """
  spe = engine.steps.steps_per_epoch
  active = [True] * engine.k if active is None else active
  step_metrics = list(step_metrics)
  perms = engine.perms(epoch)
  first = (epoch - 1) * spe
  scan = engine.can_scan and start == 0
  t0 = last_log = time.perf_counter()
  for i in range(start, 1 if scan else spe):
    if should_stop is not None and should_stop(first + i):
      return states, step_metrics, i
    if scan:
      states, m = engine.scan(states, perms, active)
    else:
      states, m = engine.step(states, perms, i, active)
    step_metrics.append(m)
    if engine.steps.speed.sync_steps:
      jax.block_until_ready(states)
    if after_step is not None:
      after_step(spe - 1 if scan else i, states, step_metrics)
    if not scan and time.perf_counter() - last_log > log_every_s > 0:
      jax.block_until_ready(m)
      logging.info("epoch %d/%d: step %d/%d (%.0f img/s)", epoch, epochs,
                   i + 1, spe, (i + 1 - start) * engine.steps.batch_size /
                   (time.perf_counter() - t0))
      last_log = time.perf_counter()
  return states, step_metrics, spe


def _num_params(states: Any) -> int:
  params = (states[0].params if isinstance(states, list)
            else jax.tree.map(lambda x: x[0], states.params))
  return int(sum(x.size for x in jax.tree.leaves(params)))


class StepHooks:
  """What the loop does between steps: train metrics every
  `train.log_every_steps` steps to the members' writers (fetched from the
  device only then, so the steps between stay asynchronous), and the
  `train.profile_steps` trace."""

  def __init__(self, engine: engine_lib.LoopEngine, t: ml_collections.ConfigDict,
               writers: Sequence[writers_lib.MetricWriter],
               lr_schedules: Sequence[Callable], trace_dir: Path):
    self.engine, self.writers, self.lr_schedules = engine, writers, lr_schedules
    self.every = t.log_every_steps
    self.profile = validation.parse_profile_steps(t.profile_steps)
    self.trace_dir, self.tracing = trace_dir, False
    self.epoch, self.active = 1, [True] * engine.k

  def before_step(self, step: int) -> bool:
    """Starts the trace at its first step; never asks to stop."""
    if self.profile and not self.tracing and (
        self.profile[0] <= step < self.profile[1]):
      jax.profiler.start_trace(str(self.trace_dir))
      self.tracing = True
    return False

  def after_step(self, i: int, states: Any, step_metrics: list) -> None:
    spe = self.engine.steps.steps_per_epoch
    first = (self.epoch - 1) * spe
    if self.tracing and first + i + 1 >= self.profile[1]:
      jax.block_until_ready(states)
      jax.profiler.stop_trace()
      self.tracing, self.profile = False, None
    # Global step counts this call's steps end at (a scanned epoch: the
    # whole epoch; its metrics are one stacked entry).
    last = first + i + 1
    new = 1 if len(step_metrics) == i + 1 else spe
    points = [c for c in range(last - new + 1, last + 1) if c % self.every == 0]
    if not points:
      return
    window = step_metrics[-self.every:]
    for j, w in enumerate(self.writers):
      if not self.active[j]:
        continue
      per = jax.device_get(self.engine.member_step_metrics(window, j))
      for c, m in zip(points, writers_lib.window_means(per, self.every,
                                                       last, points)):
        w.add_step(c, self.epoch,
                   {**m, "lr": float(self.lr_schedules[j](c - 1))})

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _loop(plan: Plan, records: list[record_lib.RunRecord],
          writers: list[writers_lib.MetricWriter],
          stop: checkpoint.StopSignals) -> None:
  cfg, k = plan.config, len(records)
  t = cfg.train
  ds = data_lib.load(cfg.dataset)
  mesh = steps_lib.make_mesh(t.num_devices)
  engine = engine_lib.build(cfg, ds, mesh, k=k, mode=plan.mode)
  steps = engine.steps
  spe = steps.steps_per_epoch
  rngs = [engine_lib.member_rngs(m.config.seed) for m in plan.members]
  states, data_init = engine.init([r for r, _ in rngs], [r for _, r in rngs],
                                  plan.hyperparams, plan.dropout_keeps)
  num_params = _num_params(states)
  compile_time = engine.compile(states)
  lr_schedules = [optim.lr_schedule(m.config.optimizer, spe, t.epochs)
                  for m in plan.members]
  where = plan.checkpoint_dir.parent

  def tree(step: int) -> Any:
    # A single run's checkpoint is its state; a group's, the stack.
    if k == 1:
      return states[0]
    return {"step": jnp.asarray(step, jnp.int32),
            "stack": engine.to_stack(states)}

  with checkpoint.RunCheckpoints(plan.checkpoint_dir, cfg.checkpoint) as ckpts:
    pos = checkpoint.Position(histories=[[] for _ in range(k)])
    step_metrics: list = []
    restored = ckpts.restore_latest(tree(0))
    if restored is not None:
      saved, meta = restored
      states = [saved] if k == 1 else engine.from_stack(saved["stack"])
      pos = checkpoint.Position.from_meta(meta)
      if pos.step_in_epoch:
        step_metrics = engine.restack_step_metrics(pos.member_step_metrics)
      for r in records:
        r.summary["resumed_from_step"] = meta["step"]
      logging.info("%s: resuming from step %d (epoch %d, step %d/%d)", where,
                   meta["step"], pos.epoch, pos.step_in_epoch, spe)
    for w in writers:
      w.open(restored[1]["step"] if restored is not None else 0)
    pos.sessions += 1
    pos.compile_time_s += compile_time
    for j, r in enumerate(records):
      r.set_history(pos.histories[j])
      r.summary.update(num_params=num_params, num_devices=int(mesh.devices.size),
                       compile_time_s=pos.compile_time_s,
                       sessions=pos.sessions, epochs_completed=pos.epoch - 1)
      if data_init[j]:
        r.summary["data_init_time_s"] = data_init[j]
      r.write()
    logging.info("%s: %s%s/%s norm=%s, %d params, %d devices, %d steps/epoch, "
                 "compiled in %.1fs", where,
                 f"{k} members ({engine.mode}), " if k > 1 else "",
                 cfg.dataset.name, cfg.model.name, cfg.model.norm, num_params,
                 mesh.devices.size, spe, compile_time)

    active = [True] * k
    hooks = StepHooks(engine, t, writers, lr_schedules, plan.members[0].run_dir)
    hooks.active = active

    def save(step: int, val_accuracy: float | None = None) -> None:
      for w in writers:
        w.save_steps()  # Before the checkpoint: it never runs ahead of it.
      pos.histories = [r.history for r in records]
      pos.member_step_metrics = [
          engine.member_step_metrics(step_metrics, j)
          if step_metrics and active[j] else [] for j in range(k)]
      ckpts.save(step, tree(step), pos.to_meta(), val_accuracy=val_accuracy)

    images_per_epoch = spe * steps.batch_size
    fulls: list[dict] = [{} for _ in range(k)]
    while pos.epoch <= t.epochs and any(active):
      epoch, start = pos.epoch, pos.step_in_epoch
      t0 = time.perf_counter()
      hooks.epoch = epoch
      states, step_metrics, done = run_epoch(
          engine, states, epoch, t.epochs, start=start,
          step_metrics=step_metrics, active=active,
          should_stop=lambda g: hooks.before_step(g) or stop.requested(g),
          log_every_s=t.log_every_s, after_step=hooks.after_step)
      if done < spe:  # A stop was requested before step `done`.
        jax.block_until_ready(states)
        hooks.close()
        pos.step_in_epoch = done
        pos.epoch_time_s += time.perf_counter() - t0
        step = (epoch - 1) * spe + done
        if step > 0 and step not in ckpts.steps:
          save(step)
        raise checkpoint.Interrupted(stop.signum, step)
      totals = engine.epoch_totals(step_metrics, active)
      epoch_time = pos.epoch_time_s + time.perf_counter() - t0
      rows: list[dict | None] = [None] * k
      for j in range(k):
        if not active[j]:
          continue
        if not math.isfinite(totals[j]["train_loss"]):
          active[j] = False
          records[j].diverged(epoch, totals[j]["train_loss"])
          logging.warning("%s: %s", records[j].run_dir,
                          records[j].summary["error"])
          continue
        rows[j] = {"epoch": epoch, "step": epoch * spe,
                   "lr": float(lr_schedules[j](epoch * spe - 1)), **totals[j]}
      live = [r is not None for r in rows]
      if any(live) and (epoch % t.eval_every == 0 or epoch == t.epochs):
        t_eval = time.perf_counter()
        evals = engine.evaluate(states, live)
        eval_time = time.perf_counter() - t_eval
        for j in range(k):
          if live[j]:
            fulls[j] = evals[j]
            rows[j].update(engine_lib.flat_eval(evals[j]),
                           eval_time_s=eval_time)
      features = engine.features(states, live) if any(live) else [None] * k
      train_time = pos.train_time_s + epoch_time
      for j in range(k):
        if not live[j]:
          continue
        if features[j] is not None:
          rows[j]["features"] = features[j]
        rows[j].update(epoch_time_s=epoch_time, train_time_s=train_time,
                       images_per_s=images_per_epoch / epoch_time)
        records[j].add_epoch(rows[j])
        writers[j].add_epoch(rows[j])
        line = format_progress(epoch, t.epochs, rows[j],
                               (t.epochs - epoch) * train_time / epoch)
        if k > 1:
          line = f"{records[j].run_dir.name}: {line}"
        logging.info("%s", line)
      pos.epoch, pos.step_in_epoch = epoch + 1, 0
      pos.train_time_s, pos.epoch_time_s = train_time, 0.0
      step_metrics = []
      if any(live) and checkpoint.should_save(epoch, t.epochs,
                                              cfg.checkpoint.every_epochs):
        save(epoch * spe,
             val_accuracy=rows[0].get("val_accuracy") if k == 1 else None)
    hooks.close()

    final = None
    for j in range(k):
      if not active[j]:
        continue
      if not fulls[j]:  # Resumed from the final checkpoint: evaluate again.
        final = final or engine.evaluate(states, active)
        fulls[j] = final[j]
      records[j].completed(ds, fulls[j], pos.train_time_s, images_per_epoch)
      writers[j].add_final(records[j].summary, (pos.epoch - 1) * spe,
                           ds.class_names)
      active[j] = False
