"""The study configs in configs/: variant counts, settings, validity, the CLI.

Every variant of every study, under every arg combination, is resolved and
checked the way a run would check it (config validation, model build and an
abstract init, optimizer and schedule over the real number of steps,
augmentation traced at the real batch size), without training. One test
trains: l1_l2's smoke sweep on real MNIST through the CLI, twice.
"""
from __future__ import annotations

import csv
import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreg import augment as augment_lib
from jaxreg import config as config_lib
from jaxreg import validation
from jaxreg import models
from jaxreg import optim
from jaxreg import sweep
from tests.helpers import ROOT, run_launch

CONFIGS = ROOT / "configs"
# Variant counts of each study's default arg, derived from studies.md.
EXPECTED_COUNTS = {
    "l1_l2": 3,
    "norms": 7,
    "batch_size": 2 * 2,
    # norm layers x (no dropout + dropout layers x p) x batch.
    "bn_dropout": 4 * (1 + 3 * 3) * 2,
    "agc": 4 * 6 * 3,  # dropout layers x clip x batch.
    "augment": 8,
    "resnet9": 4,
}
STUDIES = tuple(EXPECTED_COUNTS)
SMOKE_COUNTS = {"l1_l2": 3, "norms": 4, "batch_size": 4, "bn_dropout": 4,
                "agc": 3, "augment": 3, "resnet9": 2}
# Training-split sizes and image shapes of the datasets the configs name.
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1),
                "cifar10": (32, 32, 3)}
SAFE_NAME = re.compile(r"^[A-Za-z0-9._=,+-]+$")


def _module(study: str):
  return config_lib.load_config_file(str(CONFIGS / f"{study}.py"))[0]


def _arg_combos(study: str) -> list[str | None]:
  """Every combination of the study's args (None = the default)."""
  tokens = _module(study).ARGS
  combos = [None]
  for r in range(1, len(tokens) + 1):
    combos += [",".join(c) for c in itertools.combinations(tokens, r)]
  return combos


ALL_CASES = [(s, a) for s in STUDIES for a in _arg_combos(s)]


def _resolved(study: str, arg: str | None = None):
  module = _module(study)
  base = module.get_config(arg)
  raw = module.get_sweep(arg)
  return base, raw, [config_lib.apply_overrides(base, v) for v in raw]


def _train_examples(cfg) -> int:
  n = TRAIN_SIZES[cfg.dataset.name]
  n -= int(round(cfg.dataset.val_fraction * n))
  return min(n, cfg.dataset.train_size) if cfg.dataset.train_size else n


# --- Counts -----------------------------------------------------------------


@pytest.mark.parametrize("study", STUDIES)
def test_dry_run_lists_every_variant(study, tmp_path):
  lines = []
  rows = sweep.run(str(CONFIGS / f"{study}.py"), workdir=tmp_path,
                   dry_run=True, print_fn=lines.append)
  n = EXPECTED_COUNTS[study]
  assert lines[-1] == f"{n} variants"
  assert len(lines) == n + 1 and len(rows) == n
  assert not any(tmp_path.iterdir()), "a dry run must not write"
  if study in ("bn_dropout", "agc"):
    assert n >= 72 and _module(study).NUM_VARIANTS == n


def test_cli_dry_run_prints_one_line_per_variant():
  out = run_launch("--config=configs/agc.py", "--dry_run", timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "72 variants"
  variant_lines = [l for l in lines[:-1] if "agc_clip=" in l]
  assert len(variant_lines) == 72 == len(lines) - 1
  assert len({l.split()[0] for l in variant_lines}) == 72


# --- Every variant is valid and runnable -----------------------------------


def _check_runnable(cfg, checked_models: dict, checked_augments: set) -> None:
  """What a run checks before training, plus what only tracing would find."""
  validation.validate(cfg)
  assert cfg.dataset.name in TRAIN_SIZES, cfg.dataset.name
  shape = IMAGE_SHAPES[cfg.dataset.name]
  batch = cfg.train.batch_size
  steps_per_epoch = _train_examples(cfg) // batch
  assert steps_per_epoch >= 1, (batch, _train_examples(cfg))
  # Builds the schedule over the real run length: refuses a warmup or a
  # one-cycle peak that does not fit inside it.
  optim.make_optimizer(cfg.optimizer, steps_per_epoch, cfg.train.epochs)
  key = (cfg.augment, batch, shape)
  if key not in checked_augments:
    fn = augment_lib.make_augment(cfg.augment, shape, 10)
    images, _ = jax.eval_shape(
        fn, jax.random.key(0), jax.ShapeDtypeStruct((batch, *shape),
                                                    jnp.float32),
        jax.ShapeDtypeStruct((batch, 10), jnp.float32))
    assert images.shape[0] == augment_lib.output_batch_size(cfg.augment,
                                                            batch)
    checked_augments.add(key)
  vbs = cfg.model.norm_kwargs.virtual_batch_size
  if vbs is not None:
    assert augment_lib.output_batch_size(cfg.augment, batch) % vbs == 0
  model = models.build_model(cfg.model, 10)
  # An abstract init traces the model: it finds what only shapes reveal
  # (e.g. groups that do not divide a layer's channels). Dropout values do
  # not change the trace, only whether a slot has dropout, so one trace per
  # structure keeps this fast.
  structure = cfg.model.to_dict()
  structure["dropout"] = structure["dropout"] > 0
  if structure["dropout_per_slot"] is not None:
    structure["dropout_per_slot"] = [p > 0 for p in
                                     structure["dropout_per_slot"]]
  model_key = json.dumps([structure, cfg.train.feature_layer, shape],
                         sort_keys=True, default=str)
  if model_key not in checked_models:
    checked_models[model_key] = models.count_params(model, shape)
    if cfg.train.feature_layer is not None:
      assert cfg.train.feature_layer in models.feature_layers(model, shape)


@pytest.mark.parametrize("study,arg", ALL_CASES)
def test_every_variant_is_valid(study, arg):
  base, raw, resolved = _resolved(study, arg)
  assert raw, "a study needs at least one variant"
  assert len(config_lib.dedupe(raw)) == len(raw), "duplicate variants"
  names = [v.name for v in sweep.make_variants(raw)]  # Refuses shared names.
  assert len(set(names)) == len(names)
  for name in names:
    assert SAFE_NAME.match(name) and len(name) < 200, name
    assert name not in (".", "..")
  checked_models, checked_augments = {}, set()
  for cfg in resolved:
    _check_runnable(cfg, checked_models, checked_augments)
  smoke = arg is not None and "smoke" in arg.split(",")
  if smoke:
    _check_smoke(study, arg, raw, resolved)
    # CIFAR-10 cannot be prepared offline; smoke runs here use
    # --config.dataset.name=fashion_mnist (28x28x1) instead.
    for cfg in resolved:
      cfg = config_lib.apply_overrides(cfg,
                                       {"dataset.name": "fashion_mnist"})
      _check_runnable(cfg, checked_models, checked_augments)


def _check_smoke(study, arg, raw, resolved):
  # The subset sizes the docstrings state (l1_l2 keeps all 3).
  expected = SMOKE_COUNTS[study]
  if study == "agc" and "full" in arg.split(","):
    expected = 2
  assert len(raw) == expected
  # A subset of the full grid: the same settings but shorter runs.
  full_arg = ",".join(t for t in arg.split(",") if t != "smoke") or None
  drop_epochs = lambda v: json.dumps(
      {k: x for k, x in v.items() if k != "train.epochs"}, sort_keys=True)
  full = {drop_epochs(v) for v in _module(study).get_sweep(full_arg)}
  for v in raw:
    assert drop_epochs(v) in full, v
  for cfg in resolved:
    assert 0 < cfg.dataset.train_size <= 1024
    assert 0 < cfg.dataset.test_size <= 500
    assert cfg.train.epochs <= 2
    n = TRAIN_SIZES[cfg.dataset.name]
    assert round(cfg.dataset.val_fraction * n) <= 1000
    m = cfg.model
    if m.name in ("resnet50", "nf_resnet"):
      assert tuple(m.stage_sizes) == (1, 1, 1, 1) and m.width == 8
    elif m.name == "cifar_resnet":
      assert m.depth == 8
    elif m.name == "resnet9":
      assert m.width <= 16


@pytest.mark.parametrize("study", STUDIES)
def test_unknown_arg_is_refused_listing_the_valid_ones(study):
  module = _module(study)
  for fn in (module.get_config, module.get_sweep):
    with pytest.raises(ValueError) as e:
      fn("smoke,bogus")
    assert "bogus" in str(e.value)
    for token in module.ARGS:
      assert token in str(e.value)


# --- Settings from studies.md -----------------------------------------------


def test_l1_l2_matches_s3():
  base, raw, resolved = _resolved("l1_l2")
  assert (base.dataset.name, base.model.name) == ("mnist", "mnist_cnn")
  assert base.optimizer.name == "sgd" and base.optimizer.lr == 0.04
  assert base.optimizer.momentum == 0.9 and base.model.dropout == 0.05
  assert base.train.batch_size == 128 and base.train.epochs == 20
  got = {(c.model.norm, c.model.norm_kwargs.num_groups, c.optimizer.l1,
          c.optimizer.weight_decay, c.optimizer.decoupled_weight_decay)
         for c in resolved}
  assert got == {("batch", None, 1e-4, 1e-3, False),
                 ("group", 2, 1e-4, 0.0, False),
                 ("layer", None, 0.0, 1e-3, False)}
  assert _resolved("l1_l2", "smoke")[1] == raw


def test_norms_matches_s4():
  base, _, resolved = _resolved("norms")
  assert (base.dataset.name, base.model.name, base.model.depth) == (
      "cifar10", "cifar_resnet", 14)
  assert (base.optimizer.lr, base.optimizer.momentum) == (0.1, 0.9)
  assert base.train.batch_size == 128 and base.train.epochs == 100
  assert base.optimizer.schedule.name == "cosine"
  assert base.dataset.val_fraction == 0.1
  assert augment_lib.parse(base.augment) == [
      ("pad_crop", {"pad": 4, "mode": "constant"}), ("flip", {})]
  assert sorted(c.model.norm for c in resolved) == sorted(
      ["batch", "batch_flax", "instance", "batch_instance", "layer", "group",
       "none"])
  assert all(c.augment == base.augment for c in resolved)
  # The comparisons behind args change only what they name.
  for arg, key, value in (("step", "optimizer.schedule.name", "step"),
                          ("noaug", "augment", "")):
    _, raw, cfgs = _resolved("norms", arg)
    assert len(raw) == 7 and all(v[key] == value for v in raw)
    assert [c.model.norm for c in cfgs] == [c.model.norm for c in resolved]


def test_step_decay_divides_the_lr_by_ten_every_30_epochs():
  cfg = _resolved("norms", "step")[2][0]
  spe = _train_examples(cfg) // cfg.train.batch_size  # 45000 // 128 = 351
  assert spe == 351
  lr = optim.lr_schedule(cfg.optimizer, spe, cfg.train.epochs)
  for epoch, want in ((0, 0.1), (29, 0.1), (30, 0.01), (60, 1e-3),
                      (99, 1e-4)):
    np.testing.assert_allclose(float(lr(epoch * spe + 1)), want, rtol=1e-5)


def test_batch_size_study():
  base, raw, resolved = _resolved("batch_size")
  norms_base = _module("norms").get_config()
  assert {k: v for k, v in base.to_dict().items() if k != "name"} == {
      k: v for k, v in norms_base.to_dict().items() if k != "name"}
  got = {(c.model.norm, c.train.batch_size,
          c.model.norm_kwargs.virtual_batch_size, c.optimizer.lr)
         for c in resolved}
  assert got == {("batch", 128, 128, 0.1), ("batch", 8, 8, 0.1),
                 ("group", 128, None, 0.1), ("group", 8, None, 0.1)}
  scaled = {(c.model.norm, c.train.batch_size): c.optimizer.lr
            for c in _resolved("batch_size", "linear_lr")[2]}
  assert scaled[("batch", 8)] == scaled[("group", 8)] == pytest.approx(
      0.1 * 8 / 128)
  assert scaled[("batch", 128)] == scaled[("group", 128)] == 0.1


def test_bn_dropout_grid_matches_s1():
  base, raw, resolved = _resolved("bn_dropout")
  assert base.model.name == "resnet50"
  assert tuple(base.model.stage_sizes) == (3, 4, 6, 3)
  assert base.target_accuracy == 0.87 and base.augment == ""
  assert base.optimizer.weight_decay == 0.0
  got = [(c.model.norm_layers, c.model.dropout_layers, c.model.dropout,
          c.train.batch_size, c.train.epochs) for c in resolved]
  want = []
  for nl in range(4):
    for dl, p in [(0, 0.0)] + [(d, p) for d in (1, 2, 3)
                               for p in (0.2, 0.5, 0.8)]:
      for b, e in ((64, 200), (256, 100)):
        want.append((nl, dl, p, b, e))
  assert sorted(got) == sorted(want) and len(got) == 80


def test_agc_grid_matches_s2():
  base, raw, resolved = _resolved("agc")
  got = {(c.model.dropout_layers, c.optimizer.agc_clip, c.train.batch_size)
         for c in resolved}
  assert got == set(itertools.product(
      range(4), (0.01, 0.02, 0.04, 0.08, 0.16, 0.32), (64, 128, 256)))
  for c in resolved:
    assert c.model.name == "resnet50" and c.model.norm_layers == 0
    assert c.model.dropout == 0.2 and c.train.epochs == 1
    assert c.optimizer.agc_eps == 1e-3
  # Full runs take the clip from the config, so the command line sets it.
  full_base, full_raw, full = _resolved("agc", "full")
  assert all("optimizer.agc_clip" not in v for v in full_raw)
  assert {(c.train.batch_size, c.model.dropout_layers) for c in full} == {
      (256, d) for d in range(4)}
  chosen = config_lib.apply_overrides(full_base, {"optimizer.agc_clip": 0.04})
  assert {config_lib.apply_overrides(chosen, v).optimizer.agc_clip
          for v in full_raw} == {0.04}
  assert {c.model.name for c in _resolved("agc", "full,nf")[2]} == {
      "nf_resnet"}


def test_augment_final_models_match_s1():
  base, raw, resolved = _resolved("augment")
  assert base.train.batch_size == 256
  s1 = _module("bn_dropout").get_config()
  assert base.optimizer.to_dict() == s1.optimizer.to_dict()

  def ops(spec):
    return [name for name, _ in augment_lib.parse(spec)]

  got = [(c.model.norm_layers, c.model.dropout_layers, c.model.dropout,
          c.model.dropout_per_slot, ops(c.augment)) for c in resolved]
  assert got[:4] == [
      (0, 0, 0.0, None, []),
      (2, 2, 0.2, None, []),
      (2, 2, 0.2, None, ["pad_crop", "flip"]),
      (2, 3, 0.0, (0.1, 0.2, 0.3), ["pad_crop", "flip"]),
  ]
  assert got[4:] == [(2, 2, 0.2, None, ["cutout_extra"])] * 4
  ns = [augment_lib.parse(c.augment)[0][1]["n"] for c in resolved[4:]]
  assert ns == [2, 4, 8, 16]
  # Per-slot rates reach the model's three slots.
  assert models.slot_rates(resolved[3].model) == (0.1, 0.2, 0.3)


def test_augment_s5_comparison():
  base, raw, resolved = _resolved("augment", "s5")
  r9 = _module("resnet9").get_config()
  assert base.optimizer.to_dict() == r9.optimizer.to_dict()
  assert base.model.to_dict() == r9.model.to_dict()
  added = []
  for c in resolved:
    parsed = augment_lib.parse(c.augment)
    assert parsed[:2] == [("pad_crop", {"pad": 4, "mode": "reflect"}),
                          ("flip", {})]
    added.append(tuple(name for name, _ in parsed[2:]))
  assert added == [(), ("cutout",), ("random_erasing",), ("mixup",),
                   ("rotate",), ("blur",)]
  mixup = augment_lib.parse(resolved[3].augment)[2][1]
  cutout = augment_lib.parse(resolved[1].augment)[2][1]
  assert mixup == {"alpha": 0.2} and cutout == {"size": 8}


def test_resnet9_matches_s5():
  base, raw, resolved = _resolved("resnet9")
  o = base.optimizer
  assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.4, 0.9, True)
  assert o.weight_decay == 5e-4 and not o.decoupled_weight_decay
  assert base.train.batch_size == 512 and base.train.epochs == 24
  assert base.target_accuracy == 0.94
  assert augment_lib.parse(base.augment) == [
      ("pad_crop", {"pad": 4, "mode": "reflect"}), ("flip", {}),
      ("cutout", {"size": 8})]
  assert [c.optimizer.schedule.name for c in resolved] == [
      "onecycle", "triangular", "triangular2", "exp_range"]
  n_params = models.count_params(models.build_model(base.model, 10),
                                 (32, 32, 3))
  assert abs(n_params - 6.57e6) < 0.01e6


def test_resnet9_update_equals_davidnet_sum_loss_convention():
  """jaxreg's mean-loss update at lr 0.4, wd 5e-4 equals DavidNet's: PyTorch
  SGD (nesterov, coupled decay 5e-4 * B on every parameter) stepping with
  lr = PiecewiseLinear([0, 5, 24], [0, 0.4, 0])(epoch) / B on the summed
  loss, written out in float64 NumPy."""
  cfg = _resolved("resnet9")[2][0]
  batch = cfg.train.batch_size
  spe = 2  # Few steps per epoch so a few steps climb the ramp far.
  tx = optim.make_optimizer(cfg.optimizer, spe, cfg.train.epochs)
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8))},
            "norm": {"scale": rng.normal(size=(8,)),
                     "bias": rng.normal(size=(8,))}}
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  jparams, ref, buf = f32(params), params, None
  state = tx.init(jparams)
  for t in range(6):
    g_mean = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    # DavidNet: gradient of the summed loss, B times the mean's.
    d_p = jax.tree.map(lambda g, w: batch * g + 5e-4 * batch * w, g_mean, ref)
    buf = d_p if buf is None else jax.tree.map(lambda b, d: 0.9 * b + d,
                                               buf, d_p)
    nesterov = jax.tree.map(lambda d, b: d + 0.9 * b, d_p, buf)
    lr = np.interp(t / spe, [0, 5, 24], [0, 0.4, 0]) / batch
    ref_update = jax.tree.map(lambda s: -lr * s, nesterov)
    ref = jax.tree.map(lambda w, u: w + u, ref, ref_update)
    updates, state = tx.update(f32(g_mean), state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    if t:
      assert lr > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4,
                                                atol=1e-7),
        updates, ref_update)


# --- A real run through the CLI ---------------------------------------------


def test_l1_l2_smoke_sweep_runs_and_a_relaunch_skips_it(tmp_path,
                                                        mnist_manual_dir):
  args = ("--config=configs/l1_l2.py:smoke", f"--workdir={tmp_path}")
  out = run_launch(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  names = [v.name for v in sweep.make_variants(
      _module("l1_l2").get_sweep("smoke"))]
  assert [r["variant"] for r in rows] == names
  assert [r["status"] for r in rows] == ["completed"] * 3
  for r in rows:
    assert float(r["test_accuracy"]) > 0.2, r  # 10 classes: chance is 0.1.
    assert r["epochs_completed"] == "2"
  summaries = [tmp_path / n / "summary.json" for n in names]
  before = [p.stat().st_mtime_ns for p in summaries]
  metrics_before = [(tmp_path / n / "metrics.jsonl").read_text()
                    for n in names]

  again = run_launch(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("already completed, skipped") == 3
  assert [p.stat().st_mtime_ns for p in summaries] == before
  assert [(tmp_path / n / "metrics.jsonl").read_text()
          for n in names] == metrics_before
