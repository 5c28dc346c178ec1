"""Checkpoints of one run, automatic resume, and stopping cleanly on a signal.

Layout: `<run dir>/checkpoints/<global step>/` holds two orbax items:
  * `state`: the TrainState as a Flax state dict (params, batch_stats,
    opt_state, step), written by orbax's StandardSave (tensorstore, OCDBT);
  * `meta`: JSON with where training stands (`epoch`, the 1-based epoch to
    run next or in progress, and `step_in_epoch`, the steps of it already
    done), the cumulative timings, the metrics history (which also carries
    the time-to-target bookkeeping: cumulative train time per epoch), the
    in-progress epoch's per-step train metrics, and a fingerprint of the state.

One `RunCheckpoints` (an orbax CheckpointManager) per run keeps the last
`config.checkpoint.keep` checkpoints and, with `keep_best`, also the one with
the best validation accuracy. Restoring uses the shardings of a freshly built
state as the target, so a checkpoint written on N devices restores on M.
A latest checkpoint that fails to restore (unreadable file, wrong
fingerprint) is deleted with a warning and the previous one is used.

Signals: inside `StopSignals`, SIGTERM and SIGINT only set a flag; the train
loop polls it between steps, saves a checkpoint at that exact step (inside
the epoch if need be) and raises `Interrupted`, a SystemExit whose code is
128 + the first signal's number (143 for SIGTERM, 130 for SIGINT), as a
shell reports a process killed by that signal. A second SIGINT (Ctrl-C
twice) stops at once with KeyboardInterrupt, without a checkpoint; repeated
SIGTERMs are ignored, since schedulers and wrappers often deliver one twice.
Relaunching the same command resumes from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from orbax.checkpoint import checkpoint_managers

META_VERSION = 1
_STATE, _META = "state", "meta"


def should_save(epoch: int, epochs: int, every_epochs: int) -> bool:
  """Whether the end of `epoch` (1-based) is a checkpoint; the last always is."""
  return epoch == epochs or (every_epochs > 0 and epoch % every_epochs == 0)


def has_checkpoints(directory: str | os.PathLike) -> bool:
  """True when `directory` holds a finished checkpoint (tmp dirs do not count)."""
  directory = Path(directory)
  return directory.is_dir() and any(
      p.name.isdigit() and p.is_dir() for p in directory.iterdir())


# --- Exactness ----------------------------------------------------------------


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
  # Integer sums wrap modulo 2**32 and are exact in any order, so the value
  # does not depend on the device count or the reduction XLA picks.
  bits = jax.lax.bitcast_convert_type(x, unsigned[x.dtype.itemsize])
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _fingerprint_device(tree: Any) -> list[jax.Array]:
  return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree: Any) -> list[int]:
  """One 32-bit checksum of the raw bits per leaf.

  Catches what a restore does not: a data file overwritten with garbage that
  still decodes.
  """
  return [int(v) for v in jax.device_get(_fingerprint_device(tree))]


def encode_step_metrics(step_metrics: Sequence[dict]) -> dict:
  """Per-step train metrics as JSON: {key: {"dtype", "values"}}.

  Kept per step (not as a running sum) so a resumed epoch sums them in the
  same order as an uninterrupted one; float32 -> JSON -> float32 is exact.
  """
  host = jax.device_get(list(step_metrics))
  if not host:
    return {}
  return {k: {"dtype": str(np.asarray(host[0][k]).dtype),
              "values": [np.asarray(m[k]).item() for m in host]}
          for k in host[0]}


def decode_step_metrics(encoded: dict) -> list[dict]:
  columns = {k: np.asarray(v["values"], dtype=v["dtype"])
             for k, v in encoded.items()}
  n = len(next(iter(columns.values()))) if columns else 0
  return [{k: col[i] for k, col in columns.items()} for i in range(n)]


# --- The manager --------------------------------------------------------------


class _QuietOrbax:
  """Drops orbax's INFO lines (dozens per save); its warnings still show."""

  def filter(self, record) -> bool:
    return (record.levelno >= 30  # logging.WARNING
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


_QUIET_ORBAX = _QuietOrbax()


class CorruptCheckpoint(RuntimeError):
  """A checkpoint restored but is not the state that was saved."""


class RunCheckpoints:
  """The checkpoints of one run (orbax CheckpointManager with two items).

  Use as a context manager (or call `close()`) so the last asynchronous save
  is finished before the process moves on.
  """

  def __init__(self, directory: str | os.PathLike,
               checkpoint_config: ml_collections.ConfigDict):
    self.directory = Path(directory).absolute()
    keep_best = bool(checkpoint_config.keep_best)
    policies = [checkpoint_managers.LatestN(n=checkpoint_config.keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=_val_accuracy, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=_val_accuracy if keep_best else None, best_mode="max",
        # A save cut short by SIGKILL leaves a tmp dir; it never counts as a
        # checkpoint and is removed here.
        cleanup_tmp_directories=True, create=True,
        enable_async_checkpointing=True)
    self._keep_best = keep_best
    absl_logger = logging.get_absl_logger()
    if _QUIET_ORBAX not in absl_logger.filters:
      absl_logger.addFilter(_QUIET_ORBAX)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> RunCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._manager.close()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  @property
  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best validation accuracy (keep_best only)."""
    return self._manager.best_step() if self._keep_best else None

  def save(self, step: int, state: Any, meta: dict, *,
           val_accuracy: float | None = None) -> None:
    """Starts saving `state` and `meta` at global `step`; returns once the
    arrays are copied to the host (the files are written in the background).
    """
    state_dict = serialization.to_state_dict(state)
    meta = {**meta, "version": META_VERSION, "step": int(step),
            "fingerprint": fingerprint(state_dict)}
    metrics = None
    if self._keep_best and val_accuracy is not None:
      metrics = {"val_accuracy": float(val_accuracy)}
    self._manager.save(
        int(step), force=True, metrics=metrics,
        args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state_dict),
                                   _META: ocp.args.JsonSave(meta)}))

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """(state, meta) of `step`, the state placed like `target`'s arrays.

    Raises whatever orbax raises on an unreadable checkpoint, and
    CorruptCheckpoint when it reads but is not what was saved.
    """
    target_dict = serialization.to_state_dict(target)
    # The target's shardings (this run's mesh), not the saved ones: a
    # checkpoint from N devices restores on M.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_dict)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract),
        _META: ocp.args.JsonRestore()}))
    state_dict, meta = restored[_STATE], restored[_META]
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
      raise CorruptCheckpoint(f"step {step}: unknown meta {str(meta)[:200]}")
    if meta.get("step") != step or int(state_dict["step"]) != step:
      raise CorruptCheckpoint(
          f"step {step}: meta says step {meta.get('step')}, state says "
          f"{int(state_dict['step'])}")
    if fingerprint(state_dict) != meta.get("fingerprint"):
      raise CorruptCheckpoint(f"step {step}: the state's fingerprint differs "
                              "from the one saved with it")
    return serialization.from_state_dict(target, state_dict), meta

  def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores intact; None when there is none.

    Checkpoints newer than the one used are unusable: they are deleted (a
    new one will be written at their step) with a warning. If none
    restores, nothing is deleted and RuntimeError says what to do.
    """
    failed: list[tuple[int, BaseException]] = []
    for step in reversed(self.steps):
      try:
        out = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %s/%d is unusable (%s: %s); falling back "
                        "to the previous one", self.directory, step,
                        type(e).__name__, str(e)[:500])
        failed.append((step, e))
        continue
      for bad, _ in failed:
        logging.warning("deleting unusable checkpoint %s/%d", self.directory,
                        bad)
        self._manager.delete(bad)
      return out
    if failed:
      detail = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}"
                         for s, e in failed)
      raise RuntimeError(
          f"no checkpoint in {self.directory} restores ({detail}). If the "
          "code or model changed, use another --workdir; to start over, "
          f"delete {self.directory}") from failed[0][1]
    return None


def _val_accuracy(metrics: dict) -> float:
  return float(metrics["val_accuracy"])


# --- Signals ------------------------------------------------------------------


class Interrupted(SystemExit):
  """Training stopped on a signal after saving a checkpoint at `step`.

  A SystemExit, so it passes `except Exception` (a sweep stops too) and an
  uncaught one ends the process quietly with code 128 + signal number.
  """

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step

  def __str__(self) -> str:
    return (f"stopped by {signal.Signals(self.signum).name} at step "
            f"{self.step}; relaunch the same command to resume")


class StopSignals:
  """Turns SIGTERM/SIGINT into a stop request polled between train steps.

  The previous handlers come back on exit. Handlers can only be installed in
  the main thread; elsewhere signals keep their old behaviour. With several
  JAX processes the request comes from JAX's preemption sync point instead,
  so every process stops at the same step (its coordination service catches
  SIGTERM).
  """

  def __init__(self, signums: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
    self.signums = tuple(signums)
    self.signum: int | None = None
    self._sigints = 0
    self._previous: dict[int, Any] = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> StopSignals:
    if (not self._multiprocess
        and threading.current_thread() is threading.main_thread()):
      for s in self.signums:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self._sigints += 1
      if self._sigints > 1:
        self._restore()
        logging.warning("second SIGINT: stopping now, without a checkpoint")
        raise KeyboardInterrupt
    if self.signum is not None:
      logging.warning("%s received: already stopping", name)
      return
    self.signum = signum
    logging.warning("%s received: finishing the current step and saving a "
                    "checkpoint (Ctrl-C twice stops at once)", name)

  def requested(self, step: int) -> int | None:
    """The signal asking to stop before global `step`, else None."""
    if self._multiprocess:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
      except RuntimeError:  # The preemption service is off.
        pass
    return self.signum


@dataclasses.dataclass
class Position:
  """Where a run of K members stands; what `meta` stores besides the
  fingerprint. A single run is K = 1."""
  epoch: int = 1  # The epoch to run next or in progress (1-based).
  step_in_epoch: int = 0  # Steps of `epoch` already done.
  train_time_s: float = 0.0  # Completed epochs, excluding compilation.
  epoch_time_s: float = 0.0  # Spent so far in the in-progress epoch.
  compile_time_s: float = 0.0  # Summed over the sessions so far.
  sessions: int = 0  # How many processes have trained this run.
  # Per member: metrics.jsonl rows so far, and the per-step train metrics
  # of the in-progress epoch (empty for a member that stopped training).
  histories: list = dataclasses.field(default_factory=list)
  member_step_metrics: list = dataclasses.field(default_factory=list)

  def to_meta(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["member_step_metrics"] = [encode_step_metrics(m)
                                for m in self.member_step_metrics]
    return d

  @classmethod
  def from_meta(cls, meta: dict) -> Position:
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in meta.items() if k in fields}
    if "histories" not in meta and "history" in meta:
      # A single run's checkpoint written before runs became groups of one.
      d["histories"] = [meta["history"]]
      d["member_step_metrics"] = [meta.get("step_metrics") or {}]
    d["member_step_metrics"] = [decode_step_metrics(e or {})
                                for e in d.get("member_step_metrics", [])]
    return cls(**d)
