"""Stacked variants: K runs that share an architecture, trained as one group.

Variants of a study whose resolved configs differ only in continuous
hyperparameters or the seed (`STACKABLE_KEYS`) build the same model, data
and optimizer chain; only numbers held in the train state differ. A group
of them builds the data, model and steps once and trains every member
together through the one run loop (train.run, with a Plan of K members), each from its own seed, writing one ordinary run directory per
member (config.json, env.json, metrics.jsonl, summary.json,
misclassified.npz), so sweep tables, skipping and reports work unchanged.

Per member, everything a run of its own would draw is drawn the same way
(engine.py). This module only decides which variants form a group and what
the group's plan is. The optimizer is built once for the group with
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

Modes (`MODES`): "vmap" and "loop" are the engines of engine.py (one
vmapped program for all members, or one compiled single-member step applied
to each in turn, bit-identical to separate runs); "auto" (default) is "loop"
on CPU, "vmap" elsewhere. Like any rounding change, vmap's grouped
convolutions can make whole trajectories drift apart where training is
chaotic (tests/test_stacked.py measures both).

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
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaxreg import checkpoint
from jaxreg import config as config_lib
from jaxreg import models
from jaxreg import record as record_lib
from jaxreg import results
from jaxreg import train
from jaxreg import validation
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
INJECTED_KEYS = {"learning_rate": "optimizer.lr",
                  "momentum": "optimizer.momentum",
                  "weight_decay": "optimizer.weight_decay",
                  "l1": "optimizer.l1", "agc_clip": "optimizer.agc_clip"}

MODES: Registry[str] = Registry("stack mode")
for _mode in ("auto", "vmap", "loop"):
  MODES.add(_mode, _mode)

STACKS_DIR = ".stacks"


# --- Which variants stack ----------------------------------------------------


def _flat(config: ml_collections.ConfigDict) -> dict:
  return results.flatten_config(config.to_dict())


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
          max(r) for r in zip(*(models.slot_rates(c.model) for c in configs)))
    shared = config_lib.apply_overrides(shared, dropout)
  return shared


def member_dropout_keep(configs: Sequence[ml_collections.ConfigDict]
                        ) -> list[dict[str, np.float32]] | None:
  """Each member's models.dropout_keep, or None when they are all equal
  (the static rates then serve every member, as in a run of its own)."""
  keeps = [models.dropout_keep(c.model) for c in configs]
  if all(k == keeps[0] for k in keeps[1:]):
    return None
  return keeps


def member_hyperparams(configs: Sequence[ml_collections.ConfigDict]
                       ) -> list[dict[str, float]]:
  """Each member's value of every hyperparameter the optimizer may inject
  (those that are set; engine.py sets the ones the chain injects and
  refuses one it has no value for)."""
  out = []
  for c in configs:
    values = {}
    for name, key in INJECTED_KEYS.items():
      v = _get(c, key)
      if v is not None:
        values[name] = float(v)
    out.append(values)
  return out


# --- The group's plan ---------------------------------------------------------


def group_plan(members: Sequence[train.Member], stack_dir: str | os.PathLike,
               mode: str = "auto", *, group: str | None = None) -> train.Plan:
  """The Plan that trains stackable `members` together (checks nothing
  about their directories; train_group and sweep.py do).

  `group` names the group in each summary's "stack" entry (default: the
  stack directory's name); the checkpoint goes in `stack_dir`/checkpoints.
  """
  configs = [m.config for m in members]
  mode = resolve_mode(mode)
  shared = shared_config(configs)
  stack_dir = Path(stack_dir)
  names = [m.variant or m.run_dir.name for m in members]
  return train.Plan(
      config=shared, members=list(members),
      checkpoint_dir=stack_dir / record_lib.CHECKPOINT_DIR, mode=mode,
      hyperparams=member_hyperparams(configs),
      dropout_keeps=member_dropout_keep(configs),
      stack={"group": group or stack_dir.name, "mode": mode,
             "size": len(members), "members": names})


def check_group_dirs(members: Sequence[train.Member],
                     stack_dir: str | os.PathLike) -> None:
  """Refuses (results.ConfigMismatch) a member directory of another config
  when the group's checkpoint exists (record.check_group_member)."""
  if checkpoint.has_checkpoints(Path(stack_dir) / record_lib.CHECKPOINT_DIR):
    for m in members:
      record_lib.check_group_member(m.config, m.run_dir)


def run_group(plan: train.Plan) -> list[dict]:
  """Writes the group's group.json, then trains it (train.run)."""
  stack_dir = plan.checkpoint_dir.parent
  stack_dir.mkdir(parents=True, exist_ok=True)
  results.write_json(stack_dir / "group.json", {
      "members": plan.stack["members"],
      "run_dirs": [str(m.run_dir) for m in plan.members],
      "mode": plan.mode})
  return train.run(plan)


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
  MODES.get(mode)
  check_stackable(configs)
  for c in configs:
    validation.validate(c)
  stack_dir = Path(stack_dir)
  summaries: list[dict] = [{} for _ in range(k)]
  todo = []
  for j, (c, d) in enumerate(zip(configs, run_dirs)):
    prior = record_lib.check_prior(c, d)
    if prior.kind == "resumable":
      raise ValueError(
          f"{d} holds checkpoints of a run of its own; resume it with "
          "train.train_and_evaluate (a sweep with --stack does), or delete "
          f"{Path(d) / record_lib.CHECKPOINT_DIR} to train it in a group")
    if prior.kind == "finished":
      summaries[j] = prior.summary
    else:
      todo.append(j)
  if not todo:
    return summaries
  members = [train.Member(configs[j], Path(run_dirs[j]), variants[j],
                          overrides[j]) for j in todo]
  check_group_dirs(members, stack_dir)
  trained = run_group(group_plan(members, stack_dir, mode))
  for j, s in zip(todo, trained):
    summaries[j] = s
  return summaries
