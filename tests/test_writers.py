"""TensorBoard event files and steps.jsonl, read back with TensorBoard's own
reader, on real MNIST runs (2048 images, batch 64: 32 steps per epoch)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from jaxreg import config as config_lib
from jaxreg import results
from jaxreg import train
from jaxreg import validation
from jaxreg import writers
from tests.helpers import ROOT

SPE = 32
SMALL = {"dataset.train_size": 2048, "dataset.test_size": 1000,
         "train.batch_size": 64, "train.epochs": 2,
         "train.log_every_steps": 5}


def _config(**overrides):
  module, _ = config_lib.load_config_file(str(ROOT / "configs/mnist.py"))
  return config_lib.apply_overrides(module.get_config("smoke"),
                                    {**SMALL, **overrides})


def _events(run_dir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      str(run_dir), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return acc


def _f32(x: float) -> float:
  # Event files hold scalars as float32: the row's value rounded once.
  return float(np.float32(x))


def _check_against_jsonl(run_dir):
  acc = _events(run_dir)
  rows = results.read_jsonl(run_dir / "metrics.jsonl")
  assert [r["epoch"] for r in rows] == [1, 2]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
              "test_macro_f1", "lr", "images_per_s"):
    got = [(e.step, e.value) for e in acc.Scalars(f"epoch/{key}")]
    assert got == [(r["step"], _f32(r[key])) for r in rows], key
  steps = results.read_jsonl(run_dir / writers.STEPS_FILE)
  # Every 5th global step, across the epoch boundary (32 is no multiple).
  assert [r["step"] for r in steps] == list(range(5, 2 * SPE + 1, 5))
  for key in ("train_loss", "train_accuracy", "lr"):
    got = [(e.step, e.value) for e in acc.Scalars(f"step/{key}")]
    assert got == [(r["step"], _f32(r[key])) for r in steps], key
  assert set(acc.Tags()["images"]) == {"final/confusion",
                                       "final/misclassified"}
  return acc, rows, steps


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_manual_dir):
  run_dir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(_config(), run_dir)
  assert summary["status"] == "completed", summary.get("error")
  return run_dir


@pytest.mark.floors
def test_event_files_equal_metrics_jsonl_every_epoch(run):
  acc, rows, steps = _check_against_jsonl(run)
  # A step row is the mean over its window: the first window's loss is
  # near ln(10) at initialisation, and the train loss falls.
  assert steps[0]["train_loss"] > steps[-1]["train_loss"]
  final = acc.Scalars("final/test_accuracy")
  summary = results.read_json(run / "summary.json")
  assert [(e.step, e.value) for e in final] == [
      (2 * SPE, _f32(summary["test_accuracy"]))]
  assert results.read_json(run / "env.json")["jaxreg"] == \
      __import__("jaxreg").__version__


@pytest.mark.floors
def test_resumed_run_has_each_step_once(tmp_path, run):
  """A run that wrote events past its last checkpoint (killed before it
  could save the next) and is relaunched: the events past the checkpoint
  are written again, once."""
  shutil.copytree(run, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "checkpoints" / str(2 * SPE))
  summary = results.read_json(tmp_path / "summary.json")
  results.write_json(tmp_path / "summary.json", {**summary,
                                                 "status": "running"})
  resumed = train.train_and_evaluate(_config(), tmp_path)
  assert resumed["resumed_from_step"] == SPE
  acc, rows, steps = _check_against_jsonl(tmp_path)
  for tag in acc.Tags()["scalars"]:
    s = [e.step for e in acc.Scalars(tag)]
    assert len(s) == len(set(s)), tag
  # The same numbers as the uninterrupted run, bit for bit on CPU (times
  # aside).
  def numbers(rs):
    return [{k: v for k, v in r.items()
             if not k.endswith("_s") and k != "images_per_s"} for r in rs]
  assert numbers(rows) == numbers(results.read_jsonl(run / "metrics.jsonl"))
  assert steps == results.read_jsonl(run / writers.STEPS_FILE)


def test_tensorboard_false_writes_no_event_files(tmp_path, mnist_manual_dir):
  cfg = _config(**{"train.tensorboard": False, "train.epochs": 1,
                   "train.log_every_steps": 100})
  assert train.train_and_evaluate(cfg, tmp_path)["status"] == "completed"
  assert not list(tmp_path.glob(writers.EVENTS_GLOB))
  assert results.read_jsonl(tmp_path / writers.STEPS_FILE) == []


@pytest.mark.parametrize("spec", ["5", "3:3", "a:b", "-1:4", "1:2:3"])
def test_bad_profile_steps_is_refused(spec):
  with pytest.raises(ValueError, match="config.train.profile_steps"):
    validation.validate(_config(**{"train.profile_steps": spec}))


def test_profile_steps_write_a_trace(tmp_path, mnist_manual_dir):
  cfg = _config(**{"train.profile_steps": "3:5", "train.epochs": 1})
  assert train.train_and_evaluate(cfg, tmp_path)["status"] == "completed"
  assert list((tmp_path / "plugins" / "profile").rglob("*.xplane.pb"))


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
  import json
  import urllib.request
  req = urllib.request.Request(
      url, data=None if body is None else json.dumps(body).encode(),
      headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=10) as r:
    return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_server_shows_every_variant_of_a_sweep(
    tmp_path, mnist_manual_dir):
  """A real `tensorboard --logdir` over an l1_l2 smoke sweep: each variant's
  scalars and hparams come back from its HTTP API."""
  import subprocess
  import sys
  import time
  from jaxreg import sweep
  rows = sweep.run("configs/l1_l2.py:smoke", workdir=tmp_path / "sweep",
                   overrides={"train.epochs": 1}, print_fn=lambda s: None)
  assert all(r["status"] == "completed" for r in rows), rows
  names = sorted(r["variant"] for r in rows)
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", "--logdir",
       str(tmp_path / "sweep"), "--host", "127.0.0.1", "--port", str(port),
       "--reload_interval", "1"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 90
    runs = []
    while sorted(runs) != names:
      assert proc.poll() is None, "tensorboard exited"
      assert time.monotonic() < deadline, f"runs seen: {runs}"
      time.sleep(1)
      try:
        runs = list(_get(f"{base}/data/runs"))
      except OSError:
        pass  # Not listening yet.
    for r in rows:
      summary = results.read_json(tmp_path / "sweep" / r["variant"] /
                                  "summary.json")
      from urllib.parse import quote
      got = _get(f"{base}/data/plugin/scalars/scalars?run="
                 f"{quote(r['variant'])}&tag=final%2Ftest_accuracy")
      assert [v[2] for v in got] == [_f32(summary["test_accuracy"])]
    groups = []
    while len(groups) < len(names):
      assert time.monotonic() < deadline, groups
      groups = _get(f"{base}/data/plugin/hparams/session_groups", {
          "experimentName": "", "allowedStatuses": [
              "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
              "STATUS_RUNNING"],
          "colParams": [], "startIndex": 0, "sliceSize": 100}).get(
              "sessionGroups", [])
      time.sleep(0.5)
    by_name = {g["name"]: g["hparams"] for g in groups}
    for r in rows:
      hp = next(v for k, v in by_name.items() if r["variant"] in k)
      overrides = results.read_json(tmp_path / "sweep" / r["variant"] /
                                    "summary.json")["overrides"]
      assert overrides
      for key, value in overrides.items():
        assert hp[key] == value, (r["variant"], key, hp)
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
