"""Engines: how the K members of a run are initialised, compiled, stepped
and evaluated. A single run is K = 1.

An engine only computes; the loop in train.py decides when to step, save,
evaluate and write. Both engines compile through steps.Steps.compile, so
they get the same compiler options and the same step functions:

  * LoopEngine ("loop"): one compiled single-member step, applied to each
    member in turn. A member's numbers are bit-identical to a run of its
    own (for K = 1 it is that run). XLA:CPU runs grouped convolutions
    slower than the same work as separate convolutions (bench/stacked.py),
    so on CPU this is the faster way to train a stacked group too.
  * VmapEngine ("vmap"): the steps `jax.vmap`ped over a stack of K states
    (and rngs, permutations, hyperparameters; the data are shared): one
    program for all members. Each step equals the member's own to float
    rounding (XLA computes the batched convolutions as grouped ones, which
    round differently). Expected faster on accelerators, where one small
    run leaves most of the device idle.

Per member, everything a run of its own draws is drawn the same way: init
and train rngs split from `jax.random.key(seed)`, the epoch's permutation
from the train rng, augmentation and dropout rngs folded with the step.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxreg import data as data_lib
from jaxreg import device_data
from jaxreg import metrics as metrics_lib
from jaxreg import optim
from jaxreg import steps as steps_lib

MODES = ("loop", "vmap")
# The flat per-split metrics a metrics.jsonl row carries.
EVAL_KEYS = ("loss", "accuracy", "micro_f1", "macro_f1")


def member_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init rng, train rng) of a member (or run) with `seed`."""
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  return init_rng, train_rng


def stack_trees(trees: Sequence[Any]) -> Any:
  """Trees of equal structure -> one tree with a leading member axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack_tree(tree: Any, k: int) -> list[Any]:
  """The inverse of stack_trees for `k` members."""
  return [jax.tree.map(lambda x, j=j: x[j], tree) for j in range(k)]


def split_metrics(ds, split: str, preds: np.ndarray, loss: np.ndarray) -> dict:
  """metrics.classification_metrics of one split, with the predictions."""
  labels = {"val": ds.val_labels, "test": ds.test_labels}[split]
  m = metrics_lib.classification_metrics(labels, preds, ds.num_classes,
                                         losses=loss)
  m["preds"] = preds
  return m


def flat_eval(full: dict) -> dict:
  """{"test_accuracy": ..., ...}: the flat metrics.jsonl fields of `full`."""
  return {f"{split}_{k}": float(m[k]) for split, m in full.items()
          for k in EVAL_KEYS}


def _quantiles(layer: str, q) -> dict:
  return {"layer": layer,
          **{f"q{p:02d}": float(v)
             for p, v in zip(steps_lib.FEATURE_QUANTILES, q)}}


def injected_values(state: Any, values: dict) -> dict:
  """The entries of `values` (hyperparameter name -> a member's value) that
  `state`'s optimizer injects; refuses an injected one without a value."""
  injected = list(optim.get_hyperparams(state.opt_state))
  missing = [n for n in injected if n not in values]
  if missing:
    raise ValueError(
        f"the optimizer injects {', '.join(missing)}, for which the members "
        f"have no values (they have {', '.join(sorted(values))}); add its "
        "config key to stacked.INJECTED_KEYS")
  return {n: values[n] for n in injected}


class LoopEngine:
  """Members stepped in turn through one compiled single-member step."""

  mode = "loop"

  def __init__(self, steps: steps_lib.Steps, k: int):
    self.steps, self.k = steps, k
    self.compiled: steps_lib.Compiled | None = None
    self.rngs: list = []

  @property
  def can_scan(self) -> bool:
    return self.steps.speed.scan_epoch

  def init(self, init_rngs: Sequence[jax.Array], train_rngs: Sequence[jax.Array],
           hyperparams: Sequence[dict] | None = None,
           dropout_keeps: Sequence[dict] | None = None
           ) -> tuple[list, list[float]]:
    """Each member's initial state, as a run of its own builds it, with its
    own injected hyperparameter values and dropout keep probabilities when
    given; and each member's data-init seconds."""
    s = self.steps
    states, seconds = [], []
    for j, rng in enumerate(init_rngs):
      state, sec = s.init_state(rng), 0.0
      if s.has_data_init:
        state, sec = s.data_init(state)
      if hyperparams is not None:
        state = state.replace(opt_state=optim.set_hyperparams(
            state.opt_state, **{n: np.float32(v) for n, v in
                                injected_values(state, hyperparams[j]).items()}))
      if dropout_keeps is not None:
        state = state.replace(dropout_keep={
            n: np.float32(v) for n, v in dropout_keeps[j].items()})
      if hyperparams is not None or dropout_keeps is not None:
        state = jax.device_put(state, s.data.replicated)
      states.append(state)
      seconds.append(sec)
    self.rngs = list(train_rngs)
    return states, seconds

  def compile(self, states: list) -> float:
    self.compiled, seconds = self.steps.compile(states[0], self.rngs[0])
    return seconds

  def perms(self, epoch: int) -> list:
    return [self.steps.epoch_perm(r, epoch) for r in self.rngs]

  def step(self, states: list, perms: list, i: int,
           active: Sequence[bool]) -> tuple[list, list]:
    d, new, ms = self.steps.data, list(states), [None] * self.k
    for j in range(self.k):
      if active[j]:
        new[j], ms[j] = self.compiled.train(
            states[j], d.train_images, d.train_labels, perms[j], np.int32(i),
            self.rngs[j])
    return new, ms

  def scan(self, states: list, perms: list,
           active: Sequence[bool]) -> tuple[list, list]:
    """A whole epoch per member; metrics stacked over its steps."""
    d, new, ms = self.steps.data, list(states), [None] * self.k
    for j in range(self.k):
      if active[j]:
        new[j], ms[j] = self.compiled.scan(
            states[j], d.train_images, d.train_labels, perms[j], self.rngs[j])
    return new, ms

  def member_step_metrics(self, step_metrics: list, j: int) -> list[dict]:
    return [m[j] for m in step_metrics]

  def restack_step_metrics(self, per_member: Sequence[list[dict]]) -> list:
    # Members that stopped training (diverged) have none: None, as step().
    n = max((len(m) for m in per_member), default=0)
    return [[m[i] if m else None for m in per_member] for i in range(n)]

  def epoch_totals(self, step_metrics: list, active: Sequence[bool]
                   ) -> list[dict | None]:
    """Each member's loss and accuracy over the epoch: one sum over all
    its steps (or over a scanned epoch's stacked metrics)."""
    out = []
    for j in range(self.k):
      if not active[j]:
        out.append(None)
        continue
      totals = jax.device_get(jax.tree.map(
          lambda *x: jnp.sum(jnp.concatenate([jnp.ravel(v) for v in x])),
          *self.member_step_metrics(step_metrics, j)))
      out.append({
          "train_loss": float(totals["loss_sum"] / totals["count"]),
          "train_accuracy": float(totals["correct"] / totals["count"])})
    return out

  def predictions(self, state: Any, split: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One member's predictions and losses for every example of `split`,
    padding dropped."""
    d = self.steps.data
    x, y, n = d.eval_sets[split]
    outs = device_data.fetch([
        self.compiled.eval[split](state, x, y, np.int32(i))
        for i in range(len(y) // d.eval_batch_size)])
    preds = np.concatenate([o["pred"] for o in outs])[:n]
    loss = np.concatenate([o["loss"] for o in outs])[:n]
    return preds, loss

  def evaluate(self, states: list, active: Sequence[bool]
               ) -> list[dict | None]:
    """Per member: split -> metrics with predictions (padding dropped)."""
    host = self.steps.data.host
    return [{split: split_metrics(host, split, *self.predictions(s, split))
             for split in self.steps.data.eval_sets} if a else None
            for s, a in zip(states, active)]

  def features(self, states: list, active: Sequence[bool]
               ) -> list[dict | None]:
    layer = self.steps.feature_layer
    if not layer:
      return [None] * self.k
    probe = self.steps.data.probe_images
    return [_quantiles(layer, jax.device_get(self.compiled.features(s, probe)))
            if a else None for s, a in zip(states, active)]

  def to_stack(self, states: list) -> Any:
    return stack_trees(states)

  def from_stack(self, stacked: Any) -> list:
    return [jax.device_put(s, self.steps.data.replicated)
            for s in unstack_tree(stacked, self.k)]


class VmapEngine(LoopEngine):
  """One program over a stack of K states: the steps, vmapped."""

  mode = "vmap"

  @property
  def can_scan(self) -> bool:
    return False  # Per-step programs; a vmapped scan is not measured.

  def init(self, init_rngs, train_rngs, hyperparams=None, dropout_keeps=None):
    s = self.steps
    if s.has_data_init:
      # Host-side data init: member by member.
      states, seconds = super().init(init_rngs, train_rngs)
      stack = stack_trees(states)
    else:
      # Random values under vmap are those of each key alone, so each
      # member starts as its own run.
      stack = jax.vmap(s.init_state)(jnp.stack(list(init_rngs)))
      seconds = [0.0] * len(init_rngs)
    if hyperparams is not None:
      values = [injected_values(stack, h) for h in hyperparams]
      stack = stack.replace(opt_state=optim.set_hyperparams(
          stack.opt_state, **{name: np.asarray([v[name] for v in values],
                                               np.float32)
                              for name in values[0]}))
    if dropout_keeps is not None:
      stack = stack.replace(dropout_keep={
          name: np.asarray([kp[name] for kp in dropout_keeps], np.float32)
          for name in dropout_keeps[0]})
    self.rngs = jax.device_put(jnp.stack(list(train_rngs)),
                               s.data.replicated)
    return jax.device_put(stack, s.data.replicated), seconds

  def compile(self, states: Any) -> float:
    self.compiled, seconds = self.steps.compile(states, self.rngs,
                                                stacked=True, scan=False)
    return seconds

  def perms(self, epoch: int) -> jax.Array:
    train_rngs = [self.rngs[j] for j in range(self.k)]
    return jax.device_put(jnp.stack([self.steps.epoch_perm(r, epoch)
                                     for r in train_rngs]),
                          self.steps.data.replicated)

  def step(self, states, perms, i, active):
    del active  # A diverged member's NaNs stay in its own slice.
    d = self.steps.data
    return self.compiled.train(states, d.train_images, d.train_labels, perms,
                               np.int32(i), self.rngs)

  def scan(self, states, perms, active):
    raise NotImplementedError("the vmap engine steps one batch at a time")

  def member_step_metrics(self, step_metrics, j):
    host = jax.device_get(step_metrics)
    return [{k: v[j] for k, v in m.items()} for m in host]

  def restack_step_metrics(self, per_member):
    # Members that stopped training (diverged) have none saved; zeros stand
    # in, as their totals are never read.
    ref = next((m for m in per_member if m), [])
    full = [m or [{k: np.zeros_like(v) for k, v in r.items()} for r in ref]
            for m in per_member]
    return [{k: np.stack([full[j][i][k] for j in range(self.k)])
             for k in ref[i]} for i in range(len(ref))]

  def epoch_totals(self, step_metrics, active):
    totals = jax.device_get(jax.tree.map(
        lambda *x: jnp.sum(jnp.stack(x), axis=0), *step_metrics))
    return [{"train_loss": float(totals["loss_sum"][j] / totals["count"][j]),
             "train_accuracy": float(totals["correct"][j] /
                                     totals["count"][j])}
            if active[j] else None for j in range(self.k)]

  def evaluate(self, states, active):
    d = self.steps.data
    per_split = {}
    for split, (x, y, n) in d.eval_sets.items():
      outs = device_data.fetch([
          self.compiled.eval[split](states, x, y, np.int32(i))
          for i in range(len(y) // d.eval_batch_size)])
      preds = np.concatenate([o["pred"] for o in outs], axis=1)[:, :n]
      loss = np.concatenate([o["loss"] for o in outs], axis=1)[:, :n]
      per_split[split] = (preds, loss)
    return [{split: split_metrics(d.host, split, p[j], l[j])
             for split, (p, l) in per_split.items()} if active[j] else None
            for j in range(self.k)]

  def features(self, states, active):
    layer = self.steps.feature_layer
    if not layer:
      return [None] * self.k
    q = jax.device_get(self.compiled.features(states,
                                              self.steps.data.probe_images))
    return [_quantiles(layer, q[j]) if active[j] else None
            for j in range(self.k)]

  def to_stack(self, states):
    return states

  def from_stack(self, stacked):
    return jax.device_put(stacked, self.steps.data.replicated)


def make_engine(mode: str, steps: steps_lib.Steps, k: int) -> LoopEngine:
  """The engine of `mode` ("loop" or "vmap") for `k` members."""
  if mode not in MODES:
    raise ValueError(f"engine mode {mode!r}; valid choices: {', '.join(MODES)}")
  return (VmapEngine if mode == "vmap" else LoopEngine)(steps, k)


def build(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
          mesh: Mesh, *, k: int = 1, mode: str = "loop") -> LoopEngine:
  """`ds` placed on `mesh`, the steps of `config`, and the engine of `mode`
  for `k` members: everything a run computes with (uninitialised)."""
  data = device_data.place(ds, mesh, config.train.eval_batch_size)
  return make_engine(mode, steps_lib.Steps(config, data, mesh), k)
