"""Checkpoints, automatic resume and failure handling, on real MNIST runs.

Every run here is the same small MNIST config (2048 training images, batch
64: 32 steps per epoch, 2 epochs), so an interrupted-then-resumed run can be
compared number for number with one uninterrupted reference run.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxreg import checkpoint
from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import engine as engine_lib
from jaxreg import results
from jaxreg import steps as steps_lib
from jaxreg import sweep
from jaxreg import train
from jaxreg import validation
from jaxreg import workers as workers_lib
from tests.helpers import ROOT

SMALL = {"dataset.train_size": 2048, "dataset.test_size": 1000,
         "train.batch_size": 64, "train.epochs": 2}
STEPS_PER_EPOCH = 32
# Numbers that must not depend on whether the run was interrupted.
SUMMARY_KEYS = ("test_accuracy", "test_loss", "test_macro_f1",
                "test_confusion", "train_loss", "train_accuracy",
                "epochs_completed", "status")
ROW_KEYS = ("epoch", "step", "lr", "train_loss", "train_accuracy",
            "test_loss", "test_accuracy", "test_macro_f1")


def _config(**overrides):
  module, _ = config_lib.load_config_file(str(ROOT / "configs/mnist.py"))
  return config_lib.apply_overrides(module.get_config("smoke"),
                                    {**SMALL, **overrides})


def _cli(**overrides) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
  return [sys.executable, "launch.py", "--config=configs/mnist.py:smoke",
          "--report=false", *flags]


def _assert_same_numbers(run_dir: Path, reference: tuple):
  ref_summary, ref_rows, _ = reference
  summary = results.read_json(run_dir / "summary.json")
  rows = results.read_jsonl(run_dir / "metrics.jsonl")
  for k in SUMMARY_KEYS:
    assert summary[k] == ref_summary[k], k  # Exact: same bits on CPU.
  assert [[r[k] for k in ROW_KEYS] for r in rows] == \
         [[r[k] for k in ROW_KEYS] for r in ref_rows]


def _steps(run_dir: Path) -> list[int]:
  d = run_dir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache():
  # Every run below compiles the same programs: load them from disk.
  from jaxreg import runtime
  keys = ("jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], runtime.default_cache_dir())
  jax.config.update(keys[1], runtime.CACHE_MIN_COMPILE_S)
  yield
  for k, v in before.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_manual_dir):
  """An uninterrupted run: (summary, metrics rows, run dir)."""
  run_dir = tmp_path_factory.mktemp("reference")
  summary = train.train_and_evaluate(_config(), run_dir)
  assert summary["status"] == "completed", summary.get("error")
  assert summary.get("resumed_from_step") is None
  # Checkpoints after each epoch; the last `keep` (2) of them stay.
  assert _steps(run_dir) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  return summary, results.read_jsonl(run_dir / "metrics.jsonl"), run_dir


def test_sigkill_after_first_checkpoint_then_relaunch(tmp_path, reference):
  cmd = _cli() + [f"--workdir={tmp_path}"]
  with open(tmp_path.parent / f"{tmp_path.name}.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 240
      while not ((tmp_path / "checkpoints").is_dir() and _steps(tmp_path)):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
      assert proc.poll() is None, "the run ended before it could be killed"
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert results.read_json(tmp_path / "summary.json")["status"] == "running"
  assert _steps(tmp_path) == [STEPS_PER_EPOCH]

  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = results.read_json(tmp_path / "summary.json")
  assert summary["resumed_from_step"] == STEPS_PER_EPOCH
  assert summary["sessions"] == 2
  assert "resuming from step 32 (epoch 2, step 0/32)" in out.stderr
  _assert_same_numbers(tmp_path, reference)


def test_sigterm_mid_epoch_saves_there_and_resumes_exactly(tmp_path, reference):
  # Checkpoints only at the end: the one SIGTERM writes is the only one.
  cmd = _cli(**{"checkpoint.every_epochs": 0, "train.log_every_s": 1e-6}) + [
      f"--workdir={tmp_path}"]
  log_path = tmp_path.parent / f"{tmp_path.name}.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 240
      # A progress line inside epoch 1: there are 30 more steps to go.
      while "epoch 1/2: step 2/32" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=120)
    finally:
      proc.kill()
      proc.wait()
  text = log_path.read_text()
  assert code == 128 + signal.SIGTERM, text[-3000:]
  assert "SIGTERM received" in text and "relaunch the same command" in text
  (step,) = _steps(tmp_path)
  assert 2 < step < STEPS_PER_EPOCH, step  # Inside epoch 1, not a boundary.
  summary = results.read_json(tmp_path / "summary.json")
  assert summary["status"] == "running" and summary["epochs_completed"] == 0

  # A changed config is refused before anything is touched.
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  with pytest.raises(results.ConfigMismatch, match="optimizer.lr"):
    train.train_and_evaluate(_config(**{"optimizer.lr": 0.05}), tmp_path)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()
          if p.is_file()} == before

  # The relaunch: same config up to non-semantic keys.
  summary = train.train_and_evaluate(_config(), tmp_path)
  assert summary["resumed_from_step"] == step
  _assert_same_numbers(tmp_path, reference)


def test_sigint_stops_at_the_exact_step_and_restores_handlers(
    tmp_path, reference, monkeypatch):
  stop_at = STEPS_PER_EPOCH + 5  # Epoch 2, before its 6th step.
  requested = checkpoint.StopSignals.requested

  def signal_at(self, step):
    if step == stop_at:
      signal.raise_signal(signal.SIGINT)  # As Ctrl-C would.
    return requested(self, step)

  def handler(signum, frame):
    raise AssertionError("the run's handler should have been installed")

  previous = signal.signal(signal.SIGINT, handler)
  try:
    with monkeypatch.context() as m:
      m.setattr(checkpoint.StopSignals, "requested", signal_at)
      with pytest.raises(checkpoint.Interrupted) as e:
        train.train_and_evaluate(_config(), tmp_path)
    assert signal.getsignal(signal.SIGINT) is handler
  finally:
    signal.signal(signal.SIGINT, previous)
  assert e.value.code == 130 and e.value.step == stop_at
  assert isinstance(e.value, SystemExit)
  assert _steps(tmp_path) == [STEPS_PER_EPOCH, stop_at]
  summary = results.read_json(tmp_path / "summary.json")
  assert summary["status"] == "running" and summary["epochs_completed"] == 1

  summary = train.train_and_evaluate(_config(), tmp_path)
  assert summary["resumed_from_step"] == stop_at
  _assert_same_numbers(tmp_path, reference)
  # The resumed epoch's time is the sum of its two parts, so train_time_s
  # stays the sum of epoch times.
  rows = results.read_jsonl(tmp_path / "metrics.jsonl")
  assert rows[1]["train_time_s"] == pytest.approx(
      rows[0]["epoch_time_s"] + rows[1]["epoch_time_s"])


def test_finished_run_is_not_retrained_and_changed_config_refused(reference):
  _, _, run_dir = reference
  files = sorted(p for p in run_dir.rglob("*") if p.is_file())
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
  changed = _config(**{"optimizer.lr": 0.05, "train.label_smoothing": 0.1})
  with pytest.raises(results.ConfigMismatch) as e:
    train.train_and_evaluate(changed, run_dir)
  msg = str(e.value)
  assert "optimizer.lr, train.label_smoothing" in msg
  assert "0.04 -> 0.05" in msg and "another --workdir" in msg
  # Devices, logging and checkpoint cadence do not change the numbers.
  same = _config(**{"train.num_devices": 1, "train.log_every_s": 1.0,
                    "checkpoint.every_epochs": 3})
  assert train.train_and_evaluate(same, run_dir) == reference[0]
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
  assert sorted(p for p in run_dir.rglob("*") if p.is_file()) == files


def test_repeated_sigterm_is_one_request_and_two_sigints_stop_at_once():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with checkpoint.StopSignals() as stop:
    assert stop.requested(0) is None
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # E.g. from a wrapper and a scheduler.
    signal.raise_signal(signal.SIGINT)  # One Ctrl-C: still a clean stop.
    assert stop.requested(1) == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  assert {s: signal.getsignal(s) for s in before} == before


def _toy_state(value: float):
  """A TrainState-like tree with params, an optimizer state and a step."""
  import optax
  from jaxreg.steps import TrainState
  params = {"dense": {"kernel": np.full((3, 4), value, np.float32),
                      "bias": np.arange(4, dtype=np.float32) * value}}
  state = TrainState.create(
      apply_fn=None, params=jax.device_put(params),
      tx=optax.sgd(0.1, momentum=0.9),
      batch_stats=jax.device_put({"norm": {"mean": np.ones(4, np.float32)}}))
  return state.replace(step=jax.device_put(np.int32(value)))


def _ckpt_config(keep=3, keep_best=False):
  c = config_lib.base_config().checkpoint
  c.keep, c.keep_best = keep, keep_best
  return c


def _read_all_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


# A failed orbax restore can leave a tensorstore callback for an event loop
# it has closed; Python reports it as "Exception ignored". Harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_data", "garbage_meta",
                                    "wrong_fingerprint", "garbage_data"])
def test_corrupted_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, damage, caplog):
  ckpt_dir = tmp_path / "checkpoints"
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config()) as c:
    for v in (1, 2, 3):
      c.save(v, _toy_state(v), checkpoint.Position(epoch=v).to_meta())
  step3 = ckpt_dir / "3"
  # The arrays' bytes live in OCDBT files under .../d/.
  data = [p for p in (step3 / "state").rglob("*")
          if p.is_file() and p.parent.name == "d"]
  assert data
  if damage == "truncate_data":
    for p in data:
      p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  elif damage == "garbage_meta":
    (step3 / "meta" / "metadata").write_bytes(b"\x00garbage{")
  elif damage == "wrong_fingerprint":
    # Reads fine, but is not what was saved: only the fingerprint sees it.
    meta = json.loads((step3 / "meta" / "metadata").read_text())
    meta["fingerprint"][0] += 1
    (step3 / "meta" / "metadata").write_text(json.dumps(meta))
  else:  # Same length, random bytes.
    for p in data:
      p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))

  target = _toy_state(0)
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config()) as c:
    with caplog.at_level("WARNING"):
      state, meta = c.restore_latest(target)
    assert meta["step"] == 2 and meta["epoch"] == 2
    for got, want in zip(_read_all_leaves(state), _read_all_leaves(_toy_state(2))):
      np.testing.assert_array_equal(got, want)
    # The unusable one is gone, so training can write step 3 again.
    assert c.steps == [1, 2]
  assert "checkpoint" in caplog.text and "/3 is unusable" in caplog.text
  assert "falling back" in caplog.text


def test_no_intact_checkpoint_is_an_error_that_deletes_nothing(tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config()) as c:
    c.save(1, _toy_state(1), checkpoint.Position().to_meta())
  (ckpt_dir / "1" / "meta" / "metadata").write_text("{")
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config()) as c:
    with pytest.raises(RuntimeError, match="no checkpoint .* restores"):
      c.restore_latest(_toy_state(0))
    assert c.steps == [1]


def test_keeps_the_last_and_the_best_by_validation_accuracy(tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  accs = {1: 0.5, 2: 0.9, 3: 0.7, 4: None, 5: 0.6, 6: 0.8}
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config(2, True)) as c:
    for step, acc in accs.items():
      c.save(step, _toy_state(step), checkpoint.Position().to_meta(),
             val_accuracy=acc)
      c.wait()
    assert c.best_step() == 2
  assert _steps(tmp_path) == [2, 5, 6]
  with checkpoint.RunCheckpoints(ckpt_dir, _ckpt_config(2, False)) as c:
    for step in (7, 8):
      c.save(step, _toy_state(step), checkpoint.Position().to_meta())
      c.wait()
  assert _steps(tmp_path) == [7, 8]


def test_keep_best_needs_a_validation_split():
  config = config_lib.base_config()
  config.checkpoint.keep_best = True
  with pytest.raises(ValueError, match="val_fraction"):
    validation.check_checkpoint(config)
  config.dataset.val_fraction = 0.1
  validation.check_checkpoint(config)
  config.checkpoint.keep = 0
  with pytest.raises(ValueError, match="keep=0"):
    validation.check_checkpoint(config)


def test_step_metrics_round_trip_exactly():
  rng = np.random.default_rng(0)
  metrics = [{"loss_sum": np.float32(rng.normal() * 100),
              "correct": np.int32(rng.integers(0, 64)), "count": np.int32(64)}
             for _ in range(7)]
  back = checkpoint.decode_step_metrics(
      json.loads(json.dumps(checkpoint.encode_step_metrics(metrics))))
  for a, b in zip(metrics, back):
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()


_SAVE_ON_TWO_DEVICES = """
import sys, numpy as np, jax
from jaxreg import checkpoint, data, engine, steps
from tests.test_checkpoint import _config
assert jax.device_count() == 2
config = _config(**{"train.num_devices": 2})
state = engine.build(config, data.load(config.dataset),
                     steps.make_mesh(2)).steps.init_state(jax.random.key(3))
state = state.replace(
    params=jax.tree.map(lambda x: x * 1.5 + 0.25, state.params),
    step=jax.device_put(np.int32(7), state.step.sharding))
kernel = state.params["classifier"]["kernel"]
assert len(kernel.sharding.device_set) == 2
with checkpoint.RunCheckpoints(sys.argv[1], config.checkpoint) as c:
  c.save(7, state, checkpoint.Position(epoch=1, step_in_epoch=7).to_meta())
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(state.params)])
"""


def test_checkpoint_from_two_devices_restores_on_one(tmp_path, reference):
  ckpt_dir, dump = tmp_path / "checkpoints", tmp_path / "params.npz"
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run([sys.executable, "-c", _SAVE_ON_TWO_DEVICES,
                        str(ckpt_dir), str(dump)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]

  assert jax.device_count() == 1
  config = _config()
  target = engine_lib.build(config, data_lib.load(config.dataset),
                            steps_lib.make_mesh(1)).steps.init_state(
                                jax.random.key(0))
  with checkpoint.RunCheckpoints(ckpt_dir, config.checkpoint) as c:
    state, meta = c.restore_latest(target)
  assert meta["step"] == 7 and meta["step_in_epoch"] == 7
  saved = np.load(dump)
  leaves = jax.tree.leaves(state.params)
  assert len(leaves) == len(saved.files)
  for i, leaf in enumerate(leaves):
    assert leaf.sharding == target.params["classifier"]["kernel"].sharding
    np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])


def test_a_diverging_variant_is_recorded_and_the_sweep_goes_on(
    tmp_path, reference):
  # The second variant is the reference's config.
  variants = [{"optimizer.lr": 1e6, "model.norm": "none"},
              {"optimizer.lr": 0.04, "model.norm": "batch"}]
  rows = sweep.run(_config(), workdir=tmp_path, sweep=variants,
                   print_fn=lambda s: None)
  assert [r["status"] for r in rows] == ["diverged", "completed"]
  assert "epoch 1" in rows[0]["error"]
  diverged = tmp_path / "lr=1e+06,norm=none"
  assert results.read_json(diverged / "summary.json")["status"] == "diverged"
  assert not checkpoint.has_checkpoints(diverged / "checkpoints")
  _assert_same_numbers(tmp_path / "lr=0.04,norm=batch", reference)
  with open(tmp_path / "summary.csv", newline="") as f:
    table = [(r["variant"], r["status"]) for r in csv.DictReader(f)]
  assert table == [("lr=1e+06,norm=none", "diverged"),
                   ("lr=0.04,norm=batch", "completed")]

  # Relaunched, neither is trained again (a diverged run would only diverge
  # again); the table is unchanged.
  mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
  again = sweep.run(_config(), workdir=tmp_path, sweep=variants,
                    print_fn=lambda s: None)
  assert [r["status"] for r in again] == ["diverged", "completed"]
  assert {p: p.stat().st_mtime_ns
          for p in tmp_path.rglob("summary.json")} == mtimes


_FAKE_WORKER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
  (out / f"got-{signum}").write_text("")
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
out.mkdir()
time.sleep(30)
"""


def test_a_signal_to_the_sweep_reaches_its_workers(tmp_path, monkeypatch):
  real_popen = subprocess.Popen
  outs = []

  def popen(args, env=None):  # A worker that only waits for SIGTERM.
    outs.append(tmp_path / f"worker{len(outs)}")
    return real_popen([sys.executable, "-c", _FAKE_WORKER, str(outs[-1])])

  def signal_when_ready():
    deadline = time.monotonic() + 60
    while not (len(outs) == 2 and all(o.is_dir() for o in outs)):
      if time.monotonic() > deadline:
        return
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  workers = [{"env": {}, "devices": [i], "num_devices": 1} for i in range(2)]
  variants = sweep.make_variants([{"seed": 1}, {"seed": 2}])
  monkeypatch.setattr(workers_lib.subprocess, "Popen", popen)
  # Were the sweep not to catch it, SIGTERM would land here, not kill pytest.
  missed = []

  def catch(signum, frame):
    missed.append(signum)

  previous = signal.signal(signal.SIGTERM, catch)
  try:
    threading.Thread(target=signal_when_ready, daemon=True).start()
    with pytest.raises(SystemExit) as e:
      workers_lib.run_workers(workers, None, config_lib.base_config(), None, None,
                         variants, tmp_path)
    restored = signal.getsignal(signal.SIGTERM)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not missed and e.value.code == 128 + signal.SIGTERM
  assert all((o / f"got-{int(signal.SIGTERM)}").exists() for o in outs)
  assert restored is catch
