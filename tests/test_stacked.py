"""Stacked variants (jaxreg/stacked.py): the same numbers as separate runs.

The reference for every stacked member is its own `train.train_and_evaluate`
run on the same tiny MNIST subset: bit for bit in "loop" mode, to float
tolerance in "vmap" mode (batched convolutions round differently).
"""
import copy
import csv
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import checkpoint
from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import engine as engine_lib
from jaxreg import optim
from jaxreg import results
from jaxreg import runtime
from jaxreg import stacked
from jaxreg import steps as steps_lib
from jaxreg import sweep
from jaxreg import train
from tests.helpers import run_launch

# Same-structure runs (here the sequential references and the loop-mode
# group) compile once.
runtime.setup()

# Differ in lr, l1, weight decay and seed; the last has l1 and weight decay
# off, so the group's chain has both terms on with value 0 for it.
VARIANTS = [
    {"optimizer.lr": 0.04, "optimizer.l1": 1e-4,
     "optimizer.weight_decay": 1e-3, "seed": 0},
    {"optimizer.lr": 0.02, "optimizer.l1": 2e-4,
     "optimizer.weight_decay": 5e-4, "seed": 1},
    {"optimizer.lr": 0.04, "optimizer.l1": 0.0,
     "optimizer.weight_decay": 0.0, "seed": 2},
]
# Differ in dropout too (base 0.05): the group traces each member's rate.
# The first is VARIANTS[0], so its reference run is shared.
DROPOUT_VARIANTS = [
    VARIANTS[0],
    {**VARIANTS[1], "model.dropout": 0.0},
    {**VARIANTS[2], "model.dropout": 0.2},
]
ROW_KEYS = ("epoch", "step", "lr", "train_loss", "train_accuracy",
            "test_loss", "test_accuracy", "test_micro_f1", "test_macro_f1")


def _base():
  c = config_lib.base_config()
  c.name = "tiny_stack"
  c.dataset.train_size = 512
  c.dataset.test_size = 500
  c.train.epochs = 2
  c.train.batch_size = 128
  c.model.norm = "batch"
  c.model.dropout = 0.05
  c.optimizer.lr = 0.04
  c.target_accuracy = 0.2
  return c


def _configs(variants=VARIANTS, base=None):
  base = base or _base()
  return [config_lib.apply_overrides(base, v) for v in variants]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, mnist_manual_dir):
  """Each variant's own run directory."""
  root = tmp_path_factory.mktemp("sequential")
  dirs = []
  for j, cfg in enumerate(_configs()):
    train.train_and_evaluate(cfg, root / f"v{j}")
    dirs.append(root / f"v{j}")
  return dirs


@pytest.fixture(scope="module")
def dropout_sequential(tmp_path_factory, sequential):
  """Each DROPOUT_VARIANTS member's own run directory."""
  root = tmp_path_factory.mktemp("dropout_sequential")
  dirs = [sequential[0]]
  for j, cfg in enumerate(_configs(DROPOUT_VARIANTS)[1:], 1):
    train.train_and_evaluate(cfg, root / f"v{j}")
    dirs.append(root / f"v{j}")
  return dirs


def _rows(run_dir):
  return results.read_jsonl(run_dir / "metrics.jsonl")


def _summary(run_dir):
  return results.read_json(run_dir / "summary.json")


def _assert_same_files(stacked_dir, seq_dir):
  """Same files and keys as a run of its own; config.json identical."""
  for name in ("config.json", "env.json", "metrics.jsonl", "summary.json",
               "misclassified.npz"):
    assert (stacked_dir / name).exists(), name
  assert (json.loads((stacked_dir / "config.json").read_text())
          == json.loads((seq_dir / "config.json").read_text()))
  assert set(json.loads((stacked_dir / "env.json").read_text())) == set(
      json.loads((seq_dir / "env.json").read_text()))
  for a, b in zip(_rows(stacked_dir), _rows(seq_dir)):
    assert set(a) == set(b)
  extra = set(_summary(stacked_dir)) ^ set(_summary(seq_dir))
  assert extra == {"stack"}


# --- Which variants stack (no training) --------------------------------------


def test_grouping_rules():
  base = _base()
  c = lambda **o: config_lib.apply_overrides(
      base, {k.replace("__", "."): v for k, v in o.items()})
  configs = [
      c(optimizer__lr=0.1, seed=1),                      # 0
      c(optimizer__l1=1e-4, optimizer__momentum=0.0),    # 0
      c(optimizer__weight_decay=1e-3, target_accuracy=0.5),  # 0
      c(model__norm="layer"),                            # 1
      c(model__dropout=0.1),                             # 0: traced rate
      c(optimizer__agc_clip=0.01),                       # 2: AGC on
      c(optimizer__agc_clip=0.02, seed=3),               # 2
      c(train__label_smoothing=0.1),                     # 3
      c(model__dropout_layers=1),                        # 4: other slots
  ]
  assert stacked.group_indices(configs) == [[0, 1, 2, 4], [3], [5, 6], [7],
                                            [8]]
  with pytest.raises(ValueError, match=r"optimizer\.agc_clip \(on in one"):
    stacked.check_stackable([configs[0], configs[5]])
  with pytest.raises(ValueError, match=r"differ in model\.dropout_layers; "
                     r"only optimizer\.lr"):
    stacked.check_stackable([configs[0], configs[8]])
  # resnet50's per-slot rates stack when the slots are the same ones.
  r50 = lambda **o: c(**{"model__name": "resnet50",
                         "model__dropout_layers": 2, **o})
  slots = [r50(model__dropout=0.1), r50(model__dropout_per_slot=(0.0, 0.3)),
           r50(model__dropout_per_slot=(0.2, 0.1), seed=1),
           r50(model__dropout_layers=3, model__dropout=0.1)]
  assert stacked.group_indices(slots) == [[0, 1, 2], [3]]


def test_dropout_differences_make_the_group_trace_the_rates():
  """A group whose rates differ builds every slot at its largest rate and
  gives each member its own keep probabilities; equal rates stay static."""
  configs = _configs([{"model.dropout": 0.1}, {"model.dropout": 0.0},
                      {"model.dropout": 0.3}])
  assert stacked.shared_config(configs).model.dropout == 0.3
  assert stacked.member_dropout_keep(configs) == [
      {"dropout": np.float32(0.9)}, {"dropout": np.float32(1.0)},
      {"dropout": np.float32(1.0 - 0.3)}]
  assert stacked.member_dropout_keep(_configs()) is None
  assert stacked.shared_config(_configs()).model.dropout == 0.05
  r50 = _configs([
      {"model.name": "resnet50", "model.dropout_layers": 2,
       "model.dropout": 0.4},
      {"model.name": "resnet50", "model.dropout_layers": 2,
       "model.dropout_per_slot": (0.0, 0.5)}])
  shared = stacked.shared_config(r50)
  assert tuple(shared.model.dropout_per_slot) == (0.4, 0.5)
  assert stacked.member_dropout_keep(r50) == [
      {"drop1": np.float32(0.6), "drop2": np.float32(0.6)},
      {"drop1": np.float32(1.0), "drop2": np.float32(0.5)}]
  # Rates that differ in the config but not in the model: static.
  same = _configs([{"model.name": "resnet50", "model.dropout": 0.1},
                   {"model.name": "resnet50", "model.dropout": 0.2}])
  assert stacked.member_dropout_keep(same) is None
  assert stacked.shared_config(same).model.dropout == 0.1


def test_shared_config_enables_zero_is_off_terms_and_members_keep_values():
  configs = _configs([
      {"optimizer.momentum": 0.0, "optimizer.l1": 0.0},
      {"optimizer.momentum": 0.9, "optimizer.l1": 3e-4, "seed": 5},
  ])
  shared = stacked.shared_config(configs)
  assert shared.optimizer.momentum == 0.9 and shared.optimizer.l1 == 3e-4
  assert shared.optimizer.weight_decay == 0.0  # Off in every member.
  tx = optim.make_optimizer(shared.optimizer, 4, 2)
  names = sorted(optim.get_hyperparams(tx.init({"w": jnp.zeros(2)})))
  assert names == ["l1", "learning_rate", "momentum"]
  hps = [{k: h[k] for k in names} for h in stacked.member_hyperparams(configs)]
  assert hps == [{"l1": 0.0, "learning_rate": 0.04, "momentum": 0.0},
                 {"l1": 3e-4, "learning_rate": 0.04, "momentum": 0.9}]


@pytest.mark.parametrize("own", [
    {"momentum": 0.0},
    {"l1": 0.0},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "decoupled_weight_decay": True},
    {"name": "adam", "l1": 0.0, "weight_decay": 0.0},
])
def test_zero_valued_term_is_exactly_the_chain_without_it(own):
  """A member with a term off, run in a group chain that has it on with
  value 0, takes the same updates as its own chain (bit for bit with sgd)."""
  on = {"momentum": 0.9, "l1": 1e-3, "weight_decay": 1e-2}
  cfg_own = config_lib.optimizer_config()
  cfg_own.update({"lr": 0.1, "momentum": 0.5, "l1": 1e-3,
                  "weight_decay": 1e-2, **own})
  cfg_group = copy.deepcopy(cfg_own)
  cfg_group.update({k: on[k] for k in own if k in on})
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                           jnp.float32)},
            "classifier": {"bias": jnp.asarray(rng.normal(size=4),
                                               jnp.float32)}}
  grads = [jax.tree.map(lambda p, i=i: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32) * (i + 1), params)
           for i in range(3)]

  def run(cfg, values=None):
    tx = optim.make_optimizer(cfg, 10, 1)
    state = tx.init(params)
    if values:
      state = optim.set_hyperparams(state, **values)
    p = params
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, p)
      p = jax.tree.map(lambda a, b: a + b, p, u)
    return p

  names = optim.get_hyperparams(optim.make_optimizer(cfg_group, 10, 1).init(
      params))
  zeroed = {k: 0.0 for k in own if k in names}
  assert zeroed, "the group chain should have the term on"
  expected, got = run(cfg_own), run(cfg_group, zeroed)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    if cfg_own.name == "sgd":
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      # The added zeros are exact, but XLA fuses adam's sqrt and division
      # differently in the longer chain: 1-ulp differences.
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  # And the value matters: the same chain with the term at its stand-in
  # value moves the params differently.
  other = run(cfg_group)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(expected), jax.tree.leaves(other)))


def test_bad_input_refused_before_any_file(tmp_path):
  configs = _configs([{}, {"model.norm": "layer"}])
  with pytest.raises(ValueError, match="differ in model.norm"):
    stacked.train_group(configs, [tmp_path / "a", tmp_path / "b"],
                        tmp_path / "s")
  with pytest.raises(ValueError, match="valid choices: auto, loop, vmap"):
    stacked.train_group(configs[:1], [tmp_path / "a"], tmp_path / "s",
                        mode="pmap")
  with pytest.raises(ValueError, match="lr must be > 0"):
    stacked.train_group(_configs([{}, {"optimizer.lr": -1.0}]),
                        [tmp_path / "a", tmp_path / "b"], tmp_path / "s")
  assert not any(tmp_path.iterdir())


# --- Stacked groups against separate runs ------------------------------------


def test_loop_group_equals_separate_runs_bit_for_bit(tmp_path, sequential):
  dirs = [tmp_path / f"m{j}" for j in range(3)]
  out = stacked.train_group(_configs(), dirs, tmp_path / "stack", mode="loop",
                            variants=["a", "b", "c"],
                            overrides=VARIANTS)
  assert [s["status"] for s in out] == ["completed"] * 3
  for j, (mine, ref) in enumerate(zip(dirs, sequential)):
    _assert_same_files(mine, ref)
    a, b = _rows(mine), _rows(ref)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
      assert {k: ra[k] for k in ROW_KEYS} == {k: rb[k] for k in ROW_KEYS}
    sa, sb = _summary(mine), _summary(ref)
    for k in ("test_accuracy", "test_loss", "test_confusion",
              "test_per_class_accuracy", "train_loss", "num_params", "seed",
              "epochs_to_target"):
      assert sa[k] == sb[k], k
    assert sa["stack"]["size"] == 3 and sa["stack"]["mode"] == "loop"
    assert sa["variant"] == "abc"[j] and sa["overrides"] == VARIANTS[j]
    wa, wb = np.load(mine / "misclassified.npz"), np.load(
        ref / "misclassified.npz")
    for k in ("images", "labels", "preds"):
      np.testing.assert_array_equal(wa[k], wb[k])
  # Different seeds and hyperparameters give different runs.
  assert len({_summary(d)["test_loss"] for d in dirs}) == 3


def test_loop_group_differing_in_dropout_equals_separate_runs(
    tmp_path, dropout_sequential):
  """Rates 0.05, 0 and 0.2, traced in one compiled step: each member's
  numbers are those of its own run (which skips rate-0 slots) bit for bit."""
  dirs = [tmp_path / f"m{j}" for j in range(3)]
  out = stacked.train_group(_configs(DROPOUT_VARIANTS), dirs,
                            tmp_path / "stack", mode="loop")
  assert [s["status"] for s in out] == ["completed"] * 3
  for mine, ref in zip(dirs, dropout_sequential):
    _assert_same_files(mine, ref)
    a, b = _rows(mine), _rows(ref)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
      assert {k: ra[k] for k in ROW_KEYS} == {k: rb[k] for k in ROW_KEYS}
    for k in ("test_loss", "test_confusion", "train_loss"):
      assert _summary(mine)[k] == _summary(ref)[k], k


def test_vmap_group_differing_in_dropout_matches_separate_runs(
    tmp_path, dropout_sequential):
  dirs = [tmp_path / f"m{j}" for j in range(3)]
  out = stacked.train_group(_configs(DROPOUT_VARIANTS), dirs,
                            tmp_path / "stack", mode="vmap")
  assert [s["status"] for s in out] == ["completed"] * 3
  _assert_vmap_members_match(dirs, dropout_sequential)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _step_error(after, reference, before):
  """|after - reference| / |reference - before| over params, BatchNorm
  statistics and the momentum buffer: how far a step landed from the
  reference step, relative to the step's size."""
  pick = lambda s: (s.params, s.batch_stats, s.opt_state.inner_state)
  a, r, b = _flat(pick(after)), _flat(pick(reference)), _flat(pick(before))
  return np.linalg.norm(a - r) / np.linalg.norm(r - b)


def test_vmap_step_is_each_members_own_step_to_rounding(mnist_manual_dir):
  """From the same states, a step of the vmapped program moves each member
  as its own run's compiled step does, up to float rounding.

  Rounding now and then flips a max-pool or ReLU switch, which moves a
  step by ~1e-3 of its size; a run's own step does the same when its params
  are scaled by 1 + 1e-7 noise. Hence: most member-steps to 1e-5, all to
  1e-2, while giving a member another member's hyperparameters misses by
  more than 3e-3 every time.
  """
  configs = _configs()
  shared = stacked.shared_config(configs)
  ds = data_lib.load(shared.dataset)
  vm = engine_lib.build(shared, ds, steps_lib.make_mesh(1), k=3, mode="vmap")
  own_engine = engine_lib.make_engine("loop", vm.steps, 1)
  rngs = [engine_lib.member_rngs(c.seed) for c in configs]
  hps = stacked.member_hyperparams(configs)
  train_rngs = [r for _, r in rngs]
  stack, _ = vm.init([r for r, _ in rngs], train_rngs, hps)
  vm.compile(stack)
  own_engine.init([rngs[0][0]], [train_rngs[0]])
  own_engine.compile([jax.tree.map(lambda x: x[0], stack)])
  d = vm.steps.data
  perms = [vm.steps.epoch_perm(r, 1) for r in train_rngs]
  copy_of = lambda tree: jax.device_put(
      jax.tree.map(lambda x: jnp.array(x, copy=True), tree), d.replicated)

  def own_step(state, j, i):  # Donates `state`.
    return own_engine.compiled.train(state, d.train_images, d.train_labels,
                                     perms[j], np.int32(i), train_rngs[j])

  def with_hps(state, values):
    return state.replace(opt_state=optim.set_hyperparams(
        state.opt_state, **engine_lib.injected_values(state, values)))

  errors, wrong_errors = [], []
  for i in range(vm.steps.steps_per_epoch):
    before = [copy_of(x) for x in engine_lib.unstack_tree(stack, 3)]
    stack, m = vm.step(stack, vm.perms(1), i, [True] * 3)
    for j in range(3):
      own, mj = own_step(copy_of(before[j]), j, i)
      # The forward pass (loss before the update) agrees elementwise.
      np.testing.assert_allclose(m["loss_sum"][j], mj["loss_sum"], rtol=1e-5)
      assert abs(int(m["correct"][j]) - int(mj["correct"])) <= 1
      mine = jax.tree.map(lambda x, j=j: x[j], stack)
      errors.append(_step_error(mine, own, before[j]))
      other = with_hps(copy_of(before[j]), hps[(j + 1) % 3])
      wrong, _ = own_step(other, j, i)
      wrong_errors.append(_step_error(wrong, own, before[j]))
  errors = np.asarray(errors)
  assert np.sum(errors < 1e-5) >= len(errors) - 2, errors
  assert np.all(errors < 1e-2), errors
  assert np.all(np.asarray(wrong_errors) > 3e-3), wrong_errors


def test_vmap_group_matches_separate_runs_to_float_tolerance(tmp_path,
                                                             sequential):
  dirs = [tmp_path / f"m{j}" for j in range(3)]
  out = stacked.train_group(_configs(), dirs, tmp_path / "stack", mode="vmap")
  assert [s["status"] for s in out] == ["completed"] * 3
  _assert_vmap_members_match(dirs, sequential)


def _assert_vmap_members_match(dirs, refs):
  """vmap-stacked members against their separate runs (2 epochs)."""
  for mine, ref in zip(dirs, refs):
    _assert_same_files(mine, ref)
    (a1, a2), (b1, b2) = _rows(mine), _rows(ref)
    # One epoch (4 steps). Measured on this test's own configs: a separate
    # run with its lr changed by 1e-6 (relative), a perturbation the size of
    # rounding, moves the epoch-1 train loss by up to 1.8e-4 (relative; the
    # dropout members) and the test loss by up to 1.2e-5; vmap moved them by
    # 1e-7 here and 1.8e-4 on an AVX-512 CPU. 1e-3 leaves 5x that.
    for k in ("train_loss", "test_loss"):
      np.testing.assert_allclose(a1[k], b1[k], rtol=1e-3)
    # Near-tie logits of a barely trained net may flip a few test images.
    assert abs(a1["test_accuracy"] - b1["test_accuracy"]) <= 0.01
    # Later the runs drift apart: this barely trained net is chaotic (a
    # separate run with its lr changed by 1e-6 (relative) ends epoch 2 at
    # 32.0% instead of 26.6% test accuracy, loss 2.221 instead of 2.228),
    # so only the losses are compared, loosely.
    for k in ("train_loss", "test_loss"):
      np.testing.assert_allclose(a2[k], b2[k], rtol=2e-2)
    assert a2["lr"] == b2["lr"]
    assert _summary(mine)["stack"]["mode"] == "vmap"


def test_interrupted_group_resumes_to_the_numbers_of_separate_runs(
    tmp_path, sequential, monkeypatch):
  dirs = [tmp_path / f"m{j}" for j in range(3)]
  stack_dir = tmp_path / "stack"
  asked = []

  def requested(self, step):  # SIGTERM before global step 5 (epoch 2).
    asked.append(step)
    if step == 5:
      self.signum = signal.SIGTERM
    return self.signum

  with monkeypatch.context() as m:
    m.setattr(checkpoint.StopSignals, "requested", requested)
    with pytest.raises(checkpoint.Interrupted) as e:
      stacked.train_group(_configs(), dirs, stack_dir, mode="loop")
  assert e.value.code == 143 and e.value.step == 5
  assert [_summary(d)["status"] for d in dirs] == ["running"] * 3
  assert [len(_rows(d)) for d in dirs] == [1, 1, 1]
  assert checkpoint.has_checkpoints(stack_dir / "checkpoints")
  out = stacked.train_group(_configs(), dirs, stack_dir, mode="loop")
  assert [s["resumed_from_step"] for s in out] == [5] * 3
  for mine, ref in zip(dirs, sequential):
    for ra, rb in zip(_rows(mine), _rows(ref)):
      assert {k: ra[k] for k in ROW_KEYS} == {k: rb[k] for k in ROW_KEYS}
    assert _summary(mine)["test_loss"] == _summary(ref)["test_loss"]
  # A finished group is returned as it is.
  again = stacked.train_group(_configs(), dirs, stack_dir, mode="loop")
  assert [s["test_loss"] for s in again] == [s["test_loss"] for s in out]


# --- Through the sweep --------------------------------------------------------


def test_sweep_stacks_what_stacks_and_runs_the_rest_alone(tmp_path,
                                                          sequential):
  base = _base()
  base.train.epochs = 1
  # As the first reference run's, so the group's step is in the cache.
  base.optimizer.l1, base.optimizer.weight_decay = 1e-4, 1e-3
  variants = [{"optimizer.lr": 0.04},
              {"model.norm": "layer"},       # Not stackable: alone.
              {"optimizer.lr": 1e30},        # Diverges in its group.
              {"optimizer.lr": 0.02, "seed": 4}]
  lines = []
  rows = sweep.run(base, sweep=variants, workdir=tmp_path, stack=True,
                   print_fn=lines.append)
  names = [v.name for v in sweep.make_variants(variants)]
  assert [r["variant"] for r in rows] == names
  assert [r["status"] for r in rows] == ["completed", "completed", "diverged",
                                         "completed"]
  assert lines[0].startswith("[1-3/4] stacked: ") and lines[1] == (
      "[4/4] norm=layer")
  grouped = [_summary(tmp_path / n).get("stack") for n in names]
  assert grouped[1] is None
  assert [g["size"] for g in (grouped[0], grouped[2], grouped[3])] == [3] * 3
  assert "training loss became" in _summary(tmp_path / names[2])["error"]
  assert not (tmp_path / names[2] / "metrics.jsonl").read_text()
  table = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert list(table[0]) == ["variant", "status", "optimizer.lr", "model.norm",
                            "seed", *sweep.SUMMARY_COLUMNS]
  assert [r["status"] for r in table] == [r["status"] for r in rows]
  # The first variant is the first reference run, cut to one epoch.
  first = _rows(sequential[0])[0]
  assert float(table[0]["test_loss"]) == first["test_loss"]
  assert float(table[0]["test_accuracy"]) == first["test_accuracy"]
  assert float(table[0]["compile_time_s"]) > 0
  # A relaunch skips what is finished, stacked or not.
  mtimes = [(tmp_path / n / "summary.json").stat().st_mtime_ns for n in names]
  rows2 = sweep.run(base, sweep=variants, workdir=tmp_path, stack=True,
                    print_fn=lambda s: None)
  assert [r["status"] for r in rows2] == [r["status"] for r in rows]
  assert mtimes == [(tmp_path / n / "summary.json").stat().st_mtime_ns
                    for n in names]


def test_launch_stack_flags():
  out = run_launch("--config=configs/l1_l2.py:smoke", "--stack", "--dry_run")
  assert out.returncode == 0, out.stderr
  assert "3 variants" in out.stdout
  out = run_launch("--config=configs/l1_l2.py:smoke", "--stack",
                   "--stack_mode=pmap", "--dry_run")
  assert out.returncode != 0 and "stack_mode" in out.stderr


def test_vmap_group_compiles_with_the_single_runs_compiler_options(
    tmp_path, monkeypatch, mnist_manual_dir):
  """Every program of a vmap group is compiled with the options a run of
  its own gets (on CPU: steps.XLA_CPU_OPTIONS); both go through
  steps.Steps.compile."""
  seen = []
  real = jax.stages.Lowered.compile

  def compile_spy(self, compiler_options=None, **kwargs):
    seen.append(dict(compiler_options or {}))
    return real(self, compiler_options=compiler_options, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_spy)
  base = config_lib.apply_overrides(_base(), {"train.epochs": 1,
                                              "dataset.train_size": 256})
  configs = _configs(VARIANTS[:2], base=base)
  train.train_and_evaluate(configs[0], tmp_path / "single")
  single, seen[:] = list(seen), []
  stacked.train_group(configs, [tmp_path / "m0", tmp_path / "m1"],
                      tmp_path / "stack", mode="vmap")
  group = list(seen)
  # Train step and test evaluation at least, in both.
  assert len(single) >= 2 and len(group) >= 2
  assert all(o == steps_lib.XLA_CPU_OPTIONS for o in single + group), (
      single, group)
