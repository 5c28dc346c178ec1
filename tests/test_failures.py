"""Mistakes refused in seconds with their fix; exit statuses as documented
(README, "When things fail"); a refused relaunch changes nothing on disk."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from jaxreg import config as config_lib
from jaxreg import data as data_lib
from jaxreg import sweep
from jaxreg import train
from jaxreg import validation
from tests.helpers import run_launch

MNIST_SMOKE = ("--config=configs/mnist.py:smoke",
               "--config.dataset.train_size=512",
               "--config.dataset.test_size=500", "--config.train.epochs=1",
               "--noreport")


def _files(root) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def l1_l2_done(tmp_path_factory, mnist_manual_dir):
  workdir = tmp_path_factory.mktemp("l1_l2")
  out = run_launch("--config=configs/l1_l2.py:smoke", f"--workdir={workdir}")
  assert out.returncode == sweep.OK, out.stderr[-3000:]
  return workdir


def test_a_refused_relaunch_changes_nothing_and_exits_2(l1_l2_done, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(l1_l2_done, workdir)
  before = _files(workdir)
  out = run_launch("--config=configs/l1_l2.py:smoke", f"--workdir={workdir}",
                   "--config.optimizer.lr=0.1")
  assert out.returncode == sweep.REFUSED, out.stderr[-3000:]
  assert "optimizer.lr" in out.stderr and "refused" in out.stderr
  assert _files(workdir) == before  # summary.csv, report.md, every run dir


def test_a_relaunch_of_a_finished_sweep_exits_0(l1_l2_done, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(l1_l2_done, workdir)
  out = run_launch("--config=configs/l1_l2.py:smoke", f"--workdir={workdir}",
                   "--noreport")
  assert out.returncode == sweep.OK, out.stderr[-3000:]
  assert out.stderr.count("already completed, skipped") == 3


def test_a_sweep_whose_every_variant_is_refused_exits_2(tmp_path):
  workdir = tmp_path / "never"
  out = run_launch("--config=configs/l1_l2.py:smoke", f"--workdir={workdir}",
                   "--config.train.batch_size=0")
  assert out.returncode == sweep.REFUSED, out.stderr[-3000:]
  assert "batch_size=0 must be >= 1" in out.stderr
  assert not workdir.exists()


def test_a_variant_failing_while_training_exits_1(tmp_path, mnist_manual_dir):
  out = run_launch(*MNIST_SMOKE, f"--workdir={tmp_path}",
                   "--config.train.batch_size=100000")
  assert out.returncode == sweep.FAILED, out.stderr[-3000:]
  assert "exceeds" in (tmp_path / "summary.json").read_text()


@pytest.mark.parametrize("flag, status", [(None, sweep.OK),
                                          ("--fail_on_diverged",
                                           sweep.DIVERGED)])
def test_divergence_fails_the_job_only_when_asked(tmp_path, flag, status,
                                                  mnist_manual_dir):
  args = [*MNIST_SMOKE, f"--workdir={tmp_path}", "--config.optimizer.lr=1e6",
          "--config.model.norm=none"] + ([flag] if flag else [])
  out = run_launch(*args)
  assert out.returncode == status, out.stderr[-3000:]
  assert '"diverged"' in (tmp_path / "summary.json").read_text()


@pytest.mark.parametrize("override, expected", [
    ("--config.train.nonexistent=1", "has no field 'train.nonexistent'"),
    ("--config.optimizer.lr2=0.1", "did you mean optimizer.lr"),
])
def test_an_unknown_config_key_is_refused_in_one_line(tmp_path, override,
                                                      expected):
  out = run_launch("--config=configs/mnist.py:smoke", f"--workdir={tmp_path}",
                   override)
  assert out.returncode == sweep.REFUSED, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  lines = [l for l in out.stderr.splitlines() if "refused" in l]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]


def test_num_shards_without_an_index_is_refused(tmp_path):
  args = ("--config=configs/l1_l2.py:smoke", "--dry_run", "--num_shards=2")
  out = run_launch(*args, env={"SLURM_ARRAY_TASK_ID": "",
                               "JOB_COMPLETION_INDEX": ""})
  assert out.returncode == sweep.REFUSED, out.stderr[-3000:]
  assert "--shard_index" in out.stderr and "SLURM_ARRAY_TASK_ID" in out.stderr
  # A scheduler's index is taken: shard 1 of 2 of the three variants.
  out = run_launch(*args, env={"SLURM_ARRAY_TASK_ID": "1"})
  assert out.returncode == sweep.OK, out.stderr[-3000:]
  assert "1 variants" in out.stdout


def test_a_key_no_stage_knows_is_refused_by_name():
  c = config_lib.base_config()
  c.train.lr = 0.1  # An unlocked ConfigDict takes it silently.
  with pytest.raises(ValueError, match=r"config\.train\.lr is not an option"):
    validation.validate(c)


def test_group_count_refused_before_any_data_is_read(tmp_path, monkeypatch):
  """num_groups=3 does not divide mnist_cnn's channels: refused by
  validation, which must come before data.load (made to fail here)."""
  def no_data(cfg):
    raise AssertionError("data was read before the config was validated")

  monkeypatch.setattr(data_lib, "load", no_data)
  c = config_lib.apply_overrides(config_lib.base_config(), {
      "model.norm": "group", "model.norm_kwargs.num_groups": 3})
  with pytest.raises(ValueError, match=r"num_groups=3 does not divide"):
    validation.validate(c)
  with pytest.raises(ValueError, match=r"num_groups=3 does not divide"):
    train.train_and_evaluate(c, tmp_path)
  assert not (tmp_path / "summary.json").exists()
