"""Stacked variants: K runs that share an architecture, trained as one group.

Variants of a study whose resolved configs differ only in continuous
hyperparameters or the seed (`STACKABLE_KEYS`) build the same model, data
and optimizer chain; only numbers held in the train state differ. A group
of them builds the data, model and steps once and trains every member
together, each from its own seed, writing one ordinary run directory per
member (config.json, env.json, metrics.jsonl, summary.json,
misclassified.npz), so sweep tables, skipping and reports work unchanged.

Per member, everything a run of its own would draw is drawn the same way:
init and train rngs split from `jax.random.key(seed)`, the epoch's
permutation from the train rng, augmentation and dropout rngs folded with
the step (see train.py). The optimizer is built once for the group with
every term any member enables; each member's values of the injected
hyperparameters (`learning_rate`, `momentum`, `weight_decay`, `l1`,
`agc_clip`, see optim.py) are then set in its own optimizer state. A term
a member has off is on with value 0, which adds exactly nothing: l1 * sign(w),
weight_decay * w and momentum * trace are all 0 (the momentum buffer then
equals the gradient, which is what plain SGD steps); with SGD the updates
are bit-identical, with Adam XLA may fuse the longer chain differently
(1-ulp differences). AGC has no value that means "off", so members with and
without AGC are never stacked.

Dropout: members may differ in their rates (`model.dropout`,
`model.dropout_per_slot`), not in which slots exist (`dropout_layers`).
When their rates differ, the group's model is built with every slot any
member needs, and each member's keep probabilities
(`models.dropout_keep`) sit in its state (TrainState.dropout_keep, passed
to the model as the models.DROPOUT_COLLECTION), so the rate is a traced
number: stacked over members in "vmap" mode, an argument of the one
compiled step in "loop" mode. A traced slot draws the rng and mask an
nn.Dropout of the same name would, and one of rate 0 returns its input
exactly, as the slot a run of its own skips does (the mask's rng is folded
from the slot's own path, so no other slot's rng changes): loop mode stays
bit-identical to separate runs. Members with equal rates keep the static
rates, as before.

Modes (`MODES`):
  * "vmap": the trainer's train, eval and feature steps, `jax.vmap`ped over
    a stack of K states (and rngs, permutations, hyperparameters; the data
    are shared): one program for all members. Each step equals the member's
    own step to float rounding (XLA computes the batched convolutions as
    grouped ones, which round differently); like any rounding change, that
    can make whole trajectories drift apart where training is chaotic
    (tests/test_stacked.py measures both). The speed-up is expected on
    accelerators, where one small run leaves most of the device idle.
  * "loop": one compiled single-member step, applied to each member in turn
    every step. Bit-identical to separate runs; saves the per-run build,
    data loading and compilation only. XLA:CPU runs grouped convolutions
    slower than the same work as separate convolutions (measured in
    bench/stacked.py), so on CPU this is the faster way.
  * "auto" (default): "loop" on CPU, "vmap" elsewhere.

Not stackable: label smoothing (a Python branch in losses.cross_entropy),
grad_clip_norm, the schedule shape, dropout_layers or anything else
structural.

Checkpoints: one per group, of the whole stack, in
`<sweep dir>/.stacks/<group id>/checkpoints` (the group id hashes the
member names). SIGTERM/SIGINT saves one at the current step and raises
checkpoint.Interrupted, as a single run does; relaunching the same sweep
resumes the group with the numbers of an uninterrupted one. A relaunch that
forms a different group (other members, e.g. after `--variants` changed or a
member diverged before the interruption) starts it afresh.

Timings in a stacked member's files are the group's: epoch_time_s,
train_time_s and compile_time_s are the wall time of training all K members
together, so images_per_s is per member and the group's throughput is K
times it. summary.json adds "stack" = {"group", "mode", "size", "members"}.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxreg import checkpoint
from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import metrics as metrics_lib
from jaxreg import models
from jaxreg import optim
from jaxreg import results
from jaxreg import train
from jaxreg.registry import Registry

# Dotted config keys that may differ between members of one group.
STACKABLE_KEYS = (
    "optimizer.lr", "optimizer.weight_decay", "optimizer.l1",
    "optimizer.agc_clip", "optimizer.momentum", "seed",
    # Traced when they differ (module docstring); dropout_layers may not.
    "model.dropout", "model.dropout_per_slot",
    # Only read when the summary is written.
    "target_accuracy",
)
# Terms whose value 0 is exactly "off": a group enables them for all
# members if any member has them on (config key -> injected name).
_ZERO_IS_OFF = {"optimizer.l1": "l1", "optimizer.weight_decay": "weight_decay",
                "optimizer.momentum": "momentum"}
# Injected hyperparameter -> the config key holding its value.
_INJECTED_KEYS = {"learning_rate": "optimizer.lr",
                  "momentum": "optimizer.momentum",
                  "weight_decay": "optimizer.weight_decay",
                  "l1": "optimizer.l1", "agc_clip": "optimizer.agc_clip"}

MODES: Registry[str] = Registry("stack mode")
for _mode in ("auto", "vmap", "loop"):
  MODES.add(_mode, _mode)

STACKS_DIR = ".stacks"


# --- Which variants stack ----------------------------------------------------


def _flat(config: ml_collections.ConfigDict) -> dict:
  return results._flatten(results._jsonable(config.to_dict()))  # pylint: disable=protected-access


def stack_key(config: ml_collections.ConfigDict) -> str:
  """A string equal for two configs exactly when they can share a group:
  every key outside STACKABLE_KEYS equal, and AGC on in both or off in both.
  """
  flat = {k: v for k, v in _flat(config).items() if k not in STACKABLE_KEYS}
  flat["<agc on>"] = config.optimizer.agc_clip is not None
  return json.dumps(flat, sort_keys=True, default=repr)


def check_stackable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ValueError naming the keys that keep `configs` from one group."""
  if len(configs) < 1:
    raise ValueError("a stacked group needs at least one config")
  first = _flat(configs[0])
  for i, c in enumerate(configs[1:], 1):
    other = _flat(c)
    diff = sorted(k for k in set(first) | set(other)
                  if k not in STACKABLE_KEYS and first.get(k) != other.get(k))
    if (configs[0].optimizer.agc_clip is None) != (
        c.optimizer.agc_clip is None):
      diff.append("optimizer.agc_clip (on in one, None in the other: AGC has "
                  "no value that means off)")
    if diff:
      raise ValueError(
          f"configs 0 and {i} cannot be stacked: they differ in "
          f"{', '.join(diff)}; only {', '.join(STACKABLE_KEYS)} may differ "
          "(run them as separate groups or sequentially)")


def group_indices(configs: Sequence[ml_collections.ConfigDict]
                  ) -> list[list[int]]:
  """Partitions config indices into stackable groups, in order of first
  appearance; a group of one is a config that stacks with no other."""
  groups: dict[str, list[int]] = {}
  for i, c in enumerate(configs):
    groups.setdefault(stack_key(c), []).append(i)
  return list(groups.values())


def resolve_mode(mode: str) -> str:
  """"auto" -> "loop" on CPU, "vmap" on accelerators; others as given."""
  MODES.get(mode)
  if mode == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return mode


def group_id(names: Sequence[str]) -> str:
  """A short stable directory name for a group of variant names."""
  digest = hashlib.sha1(json.dumps(list(names)).encode()).hexdigest()[:12]
  return f"{len(names)}x-{digest}"


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def shared_config(configs: Sequence[ml_collections.ConfigDict]
                  ) -> ml_collections.ConfigDict:
  """The config the group's optimizer and steps are built from: the first
  member's, with each zero-is-off term on when any member has it on, and,
  when the members' dropout rates differ, each rate the largest any member
  has (so the model has every slot a member needs; members' own rates are
  traced, see `member_dropout_keep`)."""
  check_stackable(configs)
  shared = copy.deepcopy(configs[0])
  for key in _ZERO_IS_OFF:
    if key == "optimizer.momentum" and shared.optimizer.name != "sgd":
      continue  # Not in the adam chains.
    biggest = max(float(_get(c, key)) for c in configs)
    if biggest > 0 and float(_get(shared, key)) == 0:
      shared = config_lib.apply_overrides(shared, {key: biggest})
  if member_dropout_keep(configs) is not None:
    dropout = {"model.dropout": max(float(c.model.dropout) for c in configs)}
    if any(c.model.dropout_per_slot is not None for c in configs):
      # dropout_layers is the same in every member, hence the lengths.
      dropout["model.dropout_per_slot"] = tuple(
          max(r) for r in zip(*(_slot_rates(c.model) for c in configs)))
    shared = config_lib.apply_overrides(shared, dropout)
  return shared


def _slot_rates(model_cfg: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The rates of the dropout_layers bottleneck slots (resnet50)."""
  if model_cfg.dropout_per_slot is not None:
    return tuple(float(p) for p in model_cfg.dropout_per_slot)
  return (float(model_cfg.dropout),) * int(model_cfg.dropout_layers)


def member_dropout_keep(configs: Sequence[ml_collections.ConfigDict]
                        ) -> list[dict[str, np.float32]] | None:
  """Each member's models.dropout_keep, or None when they are all equal
  (the static rates then serve every member, as in a run of its own)."""
  keeps = [models.dropout_keep(c.model) for c in configs]
  if all(k == keeps[0] for k in keeps[1:]):
    return None
  return keeps


def member_hyperparams(configs: Sequence[ml_collections.ConfigDict],
                       injected: Sequence[str]) -> list[dict[str, float]]:
  """Each member's value of every injected hyperparameter."""
  out = []
  for c in configs:
    values = {}
    for name in injected:
      if name not in _INJECTED_KEYS:
        raise ValueError(
            f"the optimizer injects {name!r}, which stacked.py cannot set per "
            f"member (it knows {', '.join(sorted(_INJECTED_KEYS))}); add it "
            "to stacked._INJECTED_KEYS")
      values[name] = float(_get(c, _INJECTED_KEYS[name]))
    out.append(values)
  return out


# --- Engines -----------------------------------------------------------------


def _member_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init rng, train rng), as train.py splits them for a run of `seed`."""
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  return init_rng, train_rng


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def _unstack(tree: Any, k: int) -> list[Any]:
  return [jax.tree.map(lambda x, j=j: x[j], tree) for j in range(k)]


def _split_metrics(ds: data_lib.Dataset, split: str, preds: np.ndarray,
                   loss: np.ndarray) -> dict:
  labels = {"val": ds.val_labels, "test": ds.test_labels}[split]
  m = metrics_lib.classification_metrics(labels, preds, ds.num_classes,
                                         losses=loss)
  m["preds"] = preds
  return m


def _flatten_eval(full: dict) -> dict:
  return {f"{split}_{k}": float(m[k]) for split, m in full.items()
          for k in ("loss", "accuracy", "micro_f1", "macro_f1")}


class _LoopEngine:
  """Members stepped in turn through the trainer's own compiled step."""

  mode = "loop"

  def __init__(self, trainer: train._Trainer, k: int):  # pylint: disable=protected-access
    self.trainer, self.k = trainer, k

  def compile(self, states: list, rngs: list) -> float:
    return self.trainer.compile(states[0], rngs[0])

  def to_stack(self, states: list) -> Any:
    return _stack(states)

  def from_stack(self, stacked: Any) -> list:
    return [jax.device_put(s, self.trainer.repl)
            for s in _unstack(stacked, self.k)]

  def step(self, states: list, perms: list, i: int, rngs: list,
           active: Sequence[bool]) -> tuple[list, list]:
    t = self.trainer
    new, ms = list(states), [None] * self.k
    for j in range(self.k):
      if active[j]:
        new[j], ms[j] = t._train_compiled(  # pylint: disable=protected-access
            states[j], t.train_images, t.train_labels, perms[j], np.int32(i),
            rngs[j])
    return new, ms

  def perms(self, perms: list) -> list:
    return perms

  def member_step_metrics(self, step_metrics: list, j: int) -> list[dict]:
    return [m[j] for m in step_metrics]

  def restack_step_metrics(self, per_member: list[list[dict]]) -> list:
    # Members that stopped training (diverged) have none: None, as step().
    n = max(len(m) for m in per_member)
    return [[m[i] if m else None for m in per_member] for i in range(n)]

  def epoch_totals(self, step_metrics: list, active: Sequence[bool]
                   ) -> list[dict | None]:
    return [train._Trainer.epoch_totals(  # pylint: disable=protected-access
        self.member_step_metrics(step_metrics, j)) if active[j] else None
            for j in range(self.k)]

  def eval_full(self, states: list, active: Sequence[bool]
                ) -> list[dict | None]:
    return [self.trainer.eval_metrics(s)[1] if a else None
            for s, a in zip(states, active)]

  def features(self, states: list, active: Sequence[bool]
               ) -> list[dict | None]:
    return [self.trainer.features(s) if a else None
            for s, a in zip(states, active)]


class _VmapEngine:
  """One program over a stack of K states: the trainer's steps, vmapped."""

  mode = "vmap"

  def __init__(self, trainer: train._Trainer, k: int):  # pylint: disable=protected-access
    self.trainer, self.k = trainer, k
    # State, permutation and rng per member; images, labels and the step
    # index shared.
    self._train = jax.jit(
        jax.vmap(trainer._train_batch, in_axes=(0, None, None, 0, None, 0)),  # pylint: disable=protected-access
        donate_argnums=(0,))
    self._eval = jax.jit(jax.vmap(trainer._eval_batch,  # pylint: disable=protected-access
                                  in_axes=(0, None, None, None)))
    self._features = jax.jit(jax.vmap(trainer._feature_quantiles,  # pylint: disable=protected-access
                                      in_axes=(0, None)))

  def compile(self, states: Any, rngs: Any) -> float:
    t = self.trainer
    t0 = time.perf_counter()
    perms = self.perms([t._perm(jax.random.key(0))] * self.k)  # pylint: disable=protected-access
    self._train_compiled = self._train.lower(
        states, t.train_images, t.train_labels, perms, np.int32(0),
        rngs).compile()
    self._eval_compiled = {
        split: self._eval.lower(states, x, y, np.int32(0)).compile()
        for split, (x, y, _) in t.eval_sets.items()}
    if t.feature_layer:
      self._features_compiled = self._features.lower(
          states, t.probe_images).compile()
    return time.perf_counter() - t0

  def to_stack(self, states: Any) -> Any:
    return states

  def from_stack(self, stacked: Any) -> Any:
    return jax.device_put(stacked, self.trainer.repl)

  def perms(self, perms: list) -> jax.Array:
    return jax.device_put(jnp.stack(perms), self.trainer.repl)

  def step(self, states: Any, perms: jax.Array, i: int, rngs: jax.Array,
           active: Sequence[bool]) -> tuple[Any, dict]:
    del active  # A diverged member's NaNs stay in its own slice.
    t = self.trainer
    return self._train_compiled(states, t.train_images, t.train_labels, perms,
                                np.int32(i), rngs)

  def member_step_metrics(self, step_metrics: list, j: int) -> list[dict]:
    host = jax.device_get(step_metrics)
    return [{k: v[j] for k, v in m.items()} for m in host]

  def restack_step_metrics(self, per_member: list[list[dict]]) -> list:
    # Members that stopped training (diverged) have none saved; zeros stand
    # in, as their totals are never read.
    ref = next(m for m in per_member if m)
    full = [m or [{k: np.zeros_like(v) for k, v in r.items()} for r in ref]
            for m in per_member]
    return [{k: np.stack([full[j][i][k] for j in range(self.k)])
             for k in ref[i]} for i in range(len(ref))]

  def epoch_totals(self, step_metrics: list, active: Sequence[bool]
                   ) -> list[dict | None]:
    totals = jax.device_get(jax.tree.map(
        lambda *x: jnp.sum(jnp.stack(x), axis=0), *step_metrics))
    return [{"train_loss": float(totals["loss_sum"][j] / totals["count"][j]),
             "train_accuracy": float(totals["correct"][j] /
                                     totals["count"][j])}
            if active[j] else None for j in range(self.k)]

  def eval_full(self, states: Any, active: Sequence[bool]
                ) -> list[dict | None]:
    t = self.trainer
    per_split = {}
    for split, (x, y, n) in t.eval_sets.items():
      outs = jax.device_get([
          self._eval_compiled[split](states, x, y, np.int32(i))
          for i in range(len(y) // t.eval_batch_size)])
      preds = np.concatenate([o["pred"] for o in outs], axis=1)[:, :n]
      loss = np.concatenate([o["loss"] for o in outs], axis=1)[:, :n]
      per_split[split] = (preds, loss)
    return [{split: _split_metrics(t.ds, split, p[j], l[j])
             for split, (p, l) in per_split.items()} if active[j] else None
            for j in range(self.k)]

  def features(self, states: Any, active: Sequence[bool]
               ) -> list[dict | None]:
    t = self.trainer
    if not t.feature_layer:
      return [None] * self.k
    q = jax.device_get(self._features_compiled(states, t.probe_images))
    return [{"layer": t.feature_layer,
             **{f"q{p:02d}": float(v)
                for p, v in zip(train.FEATURE_QUANTILES, q[j])}}
            if active[j] else None for j in range(self.k)]


# --- The group run -----------------------------------------------------------


def _check_prior(config: ml_collections.ConfigDict, run_dir: Path,
                 group_has_checkpoints: bool) -> dict | None:
  """The member's prior summary when it is final; refuses (ConfigMismatch)
  a directory holding results or a group checkpoint of another config."""
  try:
    prior = results.read_json(run_dir / "summary.json")
  except (OSError, ValueError):
    prior = None
  if (prior or {}).get("status") in train.FINAL_STATUSES:
    results.check_same_config(run_dir, config.to_dict(),
                              f"a {prior['status']} run")
    return prior
  if checkpoint.has_checkpoints(run_dir / train.CHECKPOINT_DIR):
    raise ValueError(
        f"{run_dir} holds checkpoints of a run of its own; resume it with "
        "train.train_and_evaluate (a sweep with --stack does), or delete "
        f"{run_dir / train.CHECKPOINT_DIR} to train it in a group")
  if group_has_checkpoints and (run_dir / "config.json").exists():
    results.check_same_config(run_dir, config.to_dict(),
                              "a member of a checkpointed stacked group")
  return None


def train_group(configs: Sequence[ml_collections.ConfigDict],
                run_dirs: Sequence[str | os.PathLike],
                stack_dir: str | os.PathLike, *,
                variants: Sequence[str | None] | None = None,
                overrides: Sequence[dict] | None = None,
                mode: str = "auto") -> list[dict]:
  """Trains stackable `configs` together; one run directory per member.

  Args:
    configs: resolved configs that differ only in STACKABLE_KEYS.
    run_dirs: each member's run directory (layout as train_and_evaluate's).
    stack_dir: the group's own directory (its checkpoints).
    variants, overrides: each member's variant name and overrides, for its
      summary.
    mode: "auto", "vmap" or "loop" (module docstring).

  Returns:
    Each member's summary, as train.train_and_evaluate returns it. A member
    whose run directory already holds a completed or diverged run of the
    same config is returned as it is and not trained.

  Raises:
    ValueError: configs that do not stack, an unknown mode or a bad config,
      before any file is written, also for a run directory holding a single
      run's checkpoints; results.ConfigMismatch for a run directory of
      another config. Any failure during training marks every member
      still training "failed" and is re-raised; checkpoint.Interrupted as in
      train_and_evaluate.
  """
  k = len(configs)
  if len(run_dirs) != k:
    raise ValueError(f"{k} configs but {len(run_dirs)} run directories")
  variants = list(variants) if variants is not None else [None] * k
  overrides = list(overrides) if overrides is not None else [{}] * k
  mode = resolve_mode(mode)
  check_stackable(configs)
  for c in configs:
    config_lib.validate(c)
    checkpoint.validate(c)
  shared = shared_config(configs)
  run_dirs = [Path(d) for d in run_dirs]
  stack_dir = Path(stack_dir)
  ckpt_dir = stack_dir / train.CHECKPOINT_DIR
  has_ckpts = checkpoint.has_checkpoints(ckpt_dir)
  priors = [_check_prior(c, d, has_ckpts) for c, d in zip(configs, run_dirs)]
  summaries: list[dict] = [dict(p) if p else {} for p in priors]
  active = [p is None for p in priors]
  if not any(active):
    return summaries

  members = [v or d.name for v, d in zip(variants, run_dirs)]
  stack_info = {"group": stack_dir.name, "mode": mode, "size": k,
                "members": members}
  env = results.environment()
  for j in range(k):
    if not active[j]:
      continue
    c = configs[j]
    summaries[j] = {
        "status": "running", "variant": variants[j],
        "overrides": overrides[j] or {}, "dataset": c.dataset.name,
        "model": c.model.name, "norm": c.model.norm, "seed": c.seed,
        "target_accuracy": c.target_accuracy, "epochs_completed": 0,
        "stack": stack_info}
    run_dirs[j].mkdir(parents=True, exist_ok=True)
    results.write_json(run_dirs[j] / "config.json", c.to_dict())
    results.write_json(run_dirs[j] / "env.json", env)
    results.write_json(run_dirs[j] / "summary.json", summaries[j])
  stack_dir.mkdir(parents=True, exist_ok=True)
  results.write_json(stack_dir / "group.json",
                     {"members": members, "run_dirs": [str(d) for d in run_dirs],
                      "mode": mode})

  def write(j: int) -> None:
    results.write_json(run_dirs[j] / "summary.json", summaries[j])

  try:
    with checkpoint.StopSignals() as stop:
      _run_group(configs, shared, run_dirs, ckpt_dir, summaries, active,
                 mode, stop, write)
  except (KeyboardInterrupt, SystemExit) as e:
    for j in range(k):
      if active[j]:
        write(j)
    if isinstance(e, checkpoint.Interrupted):
      logging.warning("%s: %s", stack_dir, e)
    raise
  except BaseException as e:
    for j in range(k):
      if active[j]:
        summaries[j].update(status="failed", error=f"{type(e).__name__}: {e}")
        write(j)
    raise
  return summaries


def _run_group(configs: Sequence[ml_collections.ConfigDict],
               shared: ml_collections.ConfigDict, run_dirs: list[Path],
               ckpt_dir: Path, summaries: list[dict], active: list[bool],
               mode: str, stop: checkpoint.StopSignals,
               write: Callable[[int], None]) -> None:
  k = len(configs)
  t = shared.train
  ds = data_lib.load(shared.dataset)
  mesh = train.make_mesh(t.num_devices)
  trainer = train._Trainer(shared, ds, mesh)  # pylint: disable=protected-access
  spe = trainer.steps_per_epoch
  engine = (_VmapEngine if mode == "vmap" else _LoopEngine)(trainer, k)

  rngs = [_member_rngs(c.seed) for c in configs]
  train_rngs = [r for _, r in rngs]
  stack, data_init = _init_stack(trainer, [r for r, _ in rngs])
  hps = member_hyperparams(configs, list(optim.get_hyperparams(
      stack.opt_state)))
  stack = stack.replace(opt_state=optim.set_hyperparams(stack.opt_state, **{
      name: np.asarray([h[name] for h in hps], np.float32)
      for name in hps[0]}))
  keeps = member_dropout_keep(configs)
  if keeps is not None:
    stack = stack.replace(dropout_keep={
        name: np.asarray([kp[name] for kp in keeps], np.float32)
        for name in keeps[0]})
  num_params = int(sum(x[0].size for x in jax.tree.leaves(stack.params)))
  if mode == "vmap":
    states = jax.device_put(stack, trainer.repl)
    rng_arg = jax.device_put(jnp.stack(train_rngs), trainer.repl)
  else:
    states = [jax.device_put(s, trainer.repl) for s in _unstack(stack, k)]
    rng_arg = train_rngs
  del stack
  compile_time = engine.compile(states, rng_arg)

  lr_schedules = [optim.lr_schedule(c.optimizer, spe, t.epochs)
                  for c in configs]
  histories: list[list[dict]] = [[] for _ in range(k)]
  with checkpoint.RunCheckpoints(ckpt_dir, shared.checkpoint) as ckpts:
    pos = checkpoint.Position()
    step_metrics: list = []
    target = {"step": jnp.zeros((), jnp.int32),
              "stack": engine.to_stack(states)}
    restored = ckpts.restore_latest(target)
    if restored is not None:
      tree, meta = restored
      states = engine.from_stack(tree["stack"])
      pos = checkpoint.Position.from_meta(meta)
      histories = [list(h) for h in meta["histories"]]
      step_metrics = engine.restack_step_metrics([
          checkpoint.decode_step_metrics(e)
          for e in meta["member_step_metrics"]]) if pos.step_in_epoch else []
      for j in range(k):
        if active[j]:
          summaries[j]["resumed_from_step"] = meta["step"]
      logging.info("%s: resuming from step %d (epoch %d, step %d/%d)",
                   ckpt_dir.parent, meta["step"], pos.epoch,
                   pos.step_in_epoch, spe)
    del target
    pos.sessions += 1
    pos.compile_time_s += compile_time
    for j in range(k):
      if active[j]:
        results.write_jsonl(run_dirs[j] / "metrics.jsonl", histories[j])
        summaries[j].update(
            num_params=num_params, num_devices=int(mesh.devices.size),
            compile_time_s=pos.compile_time_s, sessions=pos.sessions,
            epochs_completed=pos.epoch - 1)
        if data_init[j]:
          summaries[j]["data_init_time_s"] = data_init[j]
        write(j)
    logging.info("stacked group of %d (%s) in %s: %s/%s norm=%s, %d params, "
                 "%d steps/epoch, compiled in %.1fs", k, mode,
                 ckpt_dir.parent, shared.dataset.name, shared.model.name,
                 shared.model.norm, num_params, spe, compile_time)

    def meta() -> dict:
      m = _shared_meta(pos)
      m["histories"] = histories
      m["member_step_metrics"] = [
          checkpoint.encode_step_metrics(
              engine.member_step_metrics(step_metrics, j))
          if step_metrics and active[j] else {} for j in range(k)]
      return m

    def save(step: int) -> None:
      ckpts.save(step, {"step": jnp.asarray(step, jnp.int32),
                        "stack": engine.to_stack(states)}, meta())

    images_per_epoch = spe * trainer.batch_size
    fulls: list[dict] = [{} for _ in range(k)]
    while pos.epoch <= t.epochs and any(active):
      epoch = pos.epoch
      t0 = time.perf_counter()
      perms = engine.perms([trainer._perm(jax.random.fold_in(  # pylint: disable=protected-access
          jax.random.fold_in(r, 1), epoch)) for r in train_rngs])
      first = (epoch - 1) * spe
      last_log = time.perf_counter()
      for i in range(pos.step_in_epoch, spe):
        if stop.requested(first + i):
          jax.block_until_ready(states)
          pos.step_in_epoch = i
          pos.epoch_time_s += time.perf_counter() - t0
          if first + i > 0 and first + i not in ckpts.steps:
            save(first + i)
          raise checkpoint.Interrupted(stop.signum, first + i)
        states, m = engine.step(states, perms, i, rng_arg, active)
        step_metrics.append(m)
        if trainer.sync_steps:  # See train._Trainer.sync_steps.
          jax.block_until_ready(states)
        if time.perf_counter() - last_log > t.log_every_s > 0:
          jax.block_until_ready(m)
          logging.info("stacked epoch %d/%d: step %d/%d", epoch, t.epochs,
                       i + 1, spe)
          last_log = time.perf_counter()
      totals = engine.epoch_totals(step_metrics, active)
      epoch_time = pos.epoch_time_s + time.perf_counter() - t0
      rows: list[dict | None] = [None] * k
      for j in range(k):
        if not active[j]:
          continue
        if not math.isfinite(totals[j]["train_loss"]):
          active[j] = False
          summaries[j].update(
              status="diverged", epochs_completed=epoch - 1,
              error=f"training loss became {totals[j]['train_loss']} in "
              f"epoch {epoch}")
          logging.warning("%s: %s", run_dirs[j], summaries[j]["error"])
          write(j)
          continue
        rows[j] = {"epoch": epoch, "step": epoch * spe,
                   "lr": float(lr_schedules[j](epoch * spe - 1)), **totals[j]}
      live = [r is not None for r in rows]
      if epoch % t.eval_every == 0 or epoch == t.epochs:
        t_eval = time.perf_counter()
        evals = engine.eval_full(states, live)
        eval_time = time.perf_counter() - t_eval
        for j in range(k):
          if live[j]:
            fulls[j] = evals[j]
            rows[j].update(_flatten_eval(evals[j]), eval_time_s=eval_time)
      features = engine.features(states, live)
      train_time = pos.train_time_s + epoch_time
      for j in range(k):
        if not live[j]:
          continue
        if features[j] is not None:
          rows[j]["features"] = features[j]
        rows[j].update(epoch_time_s=epoch_time, train_time_s=train_time,
                       images_per_s=images_per_epoch / epoch_time)
        histories[j].append(rows[j])
        results.write_jsonl(run_dirs[j] / "metrics.jsonl", histories[j])
        summaries[j]["epochs_completed"] = epoch
        logging.info("%s: %s", run_dirs[j].name, train._format_progress(  # pylint: disable=protected-access
            epoch, t.epochs, rows[j],
            (t.epochs - epoch) * train_time / epoch))
      pos.epoch, pos.step_in_epoch = epoch + 1, 0
      pos.train_time_s, pos.epoch_time_s = train_time, 0.0
      step_metrics = []
      if checkpoint.should_save(epoch, t.epochs,
                                shared.checkpoint.every_epochs):
        save(epoch * spe)

    final = None
    for j in range(k):
      if not active[j]:
        continue
      if not fulls[j]:  # Resumed from the final checkpoint.
        final = final or engine.eval_full(states, active)
        fulls[j] = final[j]
      train.finish_summary(configs[j], ds, run_dirs[j], summaries[j],
                           histories[j], fulls[j], pos.train_time_s,
                           images_per_epoch)
      active[j] = False
      write(j)


def _init_stack(trainer: train._Trainer, init_rngs: Sequence[jax.Array]  # pylint: disable=protected-access
                ) -> tuple[Any, list[float]]:
  """The members' initial states, stacked, and their data-init seconds.

  One vmapped init compiles once for the group; random values under vmap
  are those of each key alone, so each member starts as its own run. A
  model with a host-side `data_init` (train.py) is initialised member by
  member instead.
  """
  if hasattr(trainer.model, "data_init"):
    states, seconds = [], []
    for r in init_rngs:
      states.append(trainer.init_state(r))
      seconds.append(trainer.data_init_time_s)
    return _stack(states), seconds
  return (jax.vmap(trainer.init_state)(jnp.stack(list(init_rngs))),
          [0.0] * len(init_rngs))


def _shared_meta(pos: checkpoint.Position) -> dict:
  """The Position fields a group shares (histories are per member)."""
  m = pos.to_meta()
  m["history"], m["step_metrics"] = [], {}
  return m
