"""Config composition, overrides and early refusal of bad settings."""
import subprocess
import sys

import pytest

from jaxreg import config as config_lib
from jaxreg import validation
from tests.helpers import ROOT


def test_override_applies_and_keeps_types():
  c = config_lib.apply_overrides(config_lib.base_config(), {
      "optimizer.lr": 0.1, "model.norm": "group", "train.epochs": 3})
  assert c.optimizer.lr == 0.1 and c.model.norm == "group" and c.train.epochs == 3


def test_misspelled_override_refused_with_suggestion():
  with pytest.raises(KeyError, match=r"unknown config key 'optimizer.lrr'.*optimizer.lr"):
    config_lib.apply_overrides(config_lib.base_config(), {"optimizer.lrr": 0.1})


def test_wrong_type_override_refused():
  with pytest.raises(TypeError, match="train.epochs"):
    config_lib.apply_overrides(config_lib.base_config(), {"train.epochs": "many"})


def test_unknown_norm_refused_listing_valid_names():
  c = config_lib.apply_overrides(config_lib.base_config(), {"model.norm": "btach"})
  with pytest.raises(ValueError) as e:
    validation.validate(c)
  for name in ("batch", "group", "layer", "none"):
    assert name in str(e.value)


@pytest.mark.parametrize("key,value,match", [
    ("train.batch_size", 0, "batch_size"),
    ("train.label_smoothing", 1.0, "label_smoothing"),
    ("target_accuracy", 87.0, "target_accuracy"),
    ("dataset.val_fraction", 1.5, "val_fraction"),
])
def test_bad_values_refused(key, value, match):
  c = config_lib.apply_overrides(config_lib.base_config(), {key: value})
  with pytest.raises(ValueError, match=match):
    validation.validate(c)


def test_sweep_helpers():
  assert config_lib.product(a=[1, 2], b__c=["x"]) == [
      {"a": 1, "b.c": "x"}, {"a": 2, "b.c": "x"}]
  assert config_lib.zip_axes(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3},
                                                     {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="equal lengths"):
    config_lib.zip_axes(a=[1], b=[1, 2])
  assert config_lib.combine([{"a": 1}, {"a": 2}], [{"b": 3}]) == [
      {"a": 1, "b": 3}, {"a": 2, "b": 3}]
  assert config_lib.dedupe([{"a": 1, "b": 2}, {"b": 2, "a": 1}, {"a": 2}]) == [
      {"a": 1, "b": 2}, {"a": 2}]


def test_launch_refuses_misspelled_flag_before_training(tmp_path):
  out = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/mnist.py:smoke",
       "--config.optimizer.lrr=0.1", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lrr" in out.stderr
  assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"augment": "flip|cutuot(size=8)"}, "cutuot"),
    ({"augment": "cutout(sise=8)"}, "sise"),
    ({"augment": "cutout_extra(n=16)", "train.batch_size": 8}, "n=16|batch"),
    ({"optimizer.schedule.name": "onecycle",
      "optimizer.schedule.peak_epoch": 30.0, "train.epochs": 20}, "peak"),
])
def test_augmentation_and_schedule_refused_at_validation(overrides, match):
  c = config_lib.apply_overrides(config_lib.base_config(), overrides)
  with pytest.raises(ValueError, match=match):
    validation.validate(c)


def test_launch_variants_flag_takes_names_with_commas(tmp_path):
  out = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/l1_l2.py", "--dry_run",
       "--variants=norm=layer,l1=0,weight_decay=0.001", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "1 variants"
