"""Sweeps: naming, sharding, failure isolation, resumption, devices."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxreg import config as config_lib
from jaxreg import sweep
from tests.helpers import ROOT


def test_variant_names_readable_stable_and_filesystem_safe():
  assert sweep.variant_name({"model.norm": "group", "optimizer.l1": 1e-4}) == \
      "norm=group,l1=0.0001"
  assert sweep.variant_name({"model.dropout_per_slot": (0.1, 0.2, 0.3)}) == \
      "dropout_per_slot=0.1-0.2-0.3"
  assert sweep.variant_name({}) == "default"
  # Two keys sharing a last component keep their full paths.
  assert sweep.variant_name({"a.lr": 1, "b.lr": 2}) == "a.lr=1,b.lr=2"
  assert sweep.variant_name({"augment": "flip|cutout(size=8)"}) == \
      "augment=flip_cutout_size=8_"
  with pytest.raises(ValueError, match="share names"):
    sweep.make_variants([{"augment": "a/b"}, {"augment": "a b"}])


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 25])
def test_every_variant_lands_in_exactly_one_shard(num_shards):
  variants = sweep.make_variants(config_lib.product(a=range(4), b=range(5)))
  shards = [sweep.shard(variants, num_shards, i) for i in range(num_shards)]
  names = [v.name for s in shards for v in s]
  assert sorted(names) == sorted(v.name for v in variants)
  assert len(names) == len(set(names))
  # Deterministic: the same call gives the same slice.
  assert shards == [sweep.shard(variants, num_shards, i) for i in range(num_shards)]
  with pytest.raises(ValueError, match="shard_index"):
    sweep.shard(variants, num_shards, num_shards)


def test_select_unknown_variant_lists_choices():
  variants = sweep.make_variants([{"a": 1}, {"a": 2}])
  assert [v.name for v in sweep.select(variants, ["a=2"])] == ["a=2"]
  with pytest.raises(ValueError, match="a=1, a=2"):
    sweep.select(variants, ["a=3"])


def _tiny_base():
  c = config_lib.base_config()
  c.name = "tiny"
  c.dataset.train_size = 512
  c.dataset.test_size = 500
  c.train.epochs = 1
  c.train.batch_size = 64
  c.optimizer.lr = 0.04
  return c


def test_failing_variant_recorded_and_sweep_goes_on_then_rerun_skips(tmp_path, mnist_manual_dir):
  variants = [{"model.norm": "group", "model.norm_kwargs.num_groups": 3},  # 8 channels
              {"model.norm": "layer"}]
  rows = sweep.run(_tiny_base(), sweep=variants, workdir=tmp_path, print_fn=lambda s: None)
  status = {r["variant"]: r["status"] for r in rows}
  # num_groups=3 cannot divide the 8 channels: refused before any data is
  # read (nothing of it written), and the sweep goes on.
  assert status == {"norm=group,num_groups=3": "refused",
                    "norm=layer": "completed"}
  assert not (tmp_path / "norm=group,num_groups=3").exists()
  table = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert [r["status"] for r in table] == ["refused", "completed"]
  assert "num_groups" in table[0]["error"]
  assert float(table[1]["test_accuracy"]) > 0.2  # chance is 0.1
  done = tmp_path / "norm=layer" / "summary.json"
  mtime = done.stat().st_mtime_ns
  rows2 = sweep.run(_tiny_base(), sweep=variants, workdir=tmp_path, print_fn=lambda s: None)
  assert done.stat().st_mtime_ns == mtime  # skipped, not retrained
  assert [r["status"] for r in rows2] == ["refused", "completed"]
  meta = json.loads((tmp_path / "sweep.json").read_text())
  assert meta["axes"] == ["model.norm", "model.norm_kwargs.num_groups"]


def test_rerun_with_changed_config_is_refused_naming_keys(tmp_path, mnist_manual_dir):
  variants = [{"model.norm": "layer"}, {"model.norm": "none"}]
  sweep.run(_tiny_base(), sweep=variants, workdir=tmp_path, print_fn=lambda s: None)
  changed = config_lib.apply_overrides(_tiny_base(), {"optimizer.lr": 0.01})
  rows = sweep.run(changed, sweep=variants, workdir=tmp_path, print_fn=lambda s: None)
  assert all(r["status"] == "refused" and "optimizer.lr" in r["error"]
             for r in rows)
  # The completed results on disk are untouched.
  for v in ("norm=layer", "norm=none"):
    assert json.loads((tmp_path / v / "summary.json").read_text())["status"] == "completed"


_MULTI = textwrap.dedent("""
    import json
    import jax, numpy as np
    from jaxreg import config as config_lib, data as data_lib, engine, steps
    assert jax.device_count() == 8, jax.devices()
    c = config_lib.base_config()
    c.dataset.train_size = 512
    c.dataset.test_size = 200
    c.train.batch_size = 64
    c.model.dropout = 0.0  # dropout masks depend on the shard layout
    ds = data_lib.load(c.dataset)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])

    def one_step(num_devices, **norm_kwargs):
      c.train.num_devices = num_devices
      c.model.norm_kwargs.virtual_batch_size = norm_kwargs.get("virtual_batch_size")
      e = engine.build(c, ds, steps.make_mesh(num_devices))
      (s0,), _ = e.init([jax.random.key(0)], [jax.random.key(1)])
      before = flat((s0.params, s0.batch_stats))
      e.compile([s0])
      d = e.steps.data
      s, m = e.compiled.train(s0, d.train_images, d.train_labels,
                              e.steps.perm(jax.random.key(5)), np.int32(0),
                              jax.random.key(1))
      sharding = jax.tree.leaves(s.params)[0].sharding
      return (float(m["loss_sum"]), before, flat((s.params, s.batch_stats)),
              len(sharding.device_set), sharding.is_fully_replicated)

    loss1, p0, p1, _, _ = one_step(1)
    loss8, _, p8, ndev, replicated = one_step(8)
    # What per-device statistics would give: ghost batches of 64/8 = 8.
    loss_g, _, pg, _, _ = one_step(1, virtual_batch_size=8)
    update = np.linalg.norm(p1 - p0)
    print(json.dumps({"loss1": loss1, "loss8": loss8, "loss_ghost": loss_g,
                      "err": float(np.linalg.norm(p8 - p1) / update),
                      "err_ghost": float(np.linalg.norm(pg - p1) / update),
                      "ndev": ndev, "replicated": replicated}))
""")


def _run_8_devices(script: str, *args: str, timeout=300):
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_data_parallel_step_equals_single_device_step(mnist_manual_dir):
  """BatchNorm statistics over the global batch: 8 shards == 1 device.

  One SGD step of the BN network on the same global batch of 64, on 1 and on
  8 devices: parameters and running statistics agree to float rounding
  (measured ~1e-4 of the update's norm: BN-bias gradients nearly cancel,
  which magnifies reduction-order noise). Per-device statistics, emulated by
  ghost batches of 8, are two orders of magnitude further off, so this test
  would catch them.
  """
  res = json.loads(_run_8_devices(_MULTI).stdout.strip().splitlines()[-1])
  assert res["ndev"] == 8 and res["replicated"]
  assert abs(res["loss1"] - res["loss8"]) <= 1e-5 * res["loss1"]
  assert res["err"] < 1e-3, res
  assert res["err_ghost"] > 3e-2, res
  assert abs(res["loss_ghost"] - res["loss1"]) > 1e-3 * res["loss1"]


_SIDE = textwrap.dedent("""
    import json, sys
    from jaxreg import config as config_lib, sweep
    c = config_lib.base_config()
    c.dataset.train_size = 256
    c.dataset.test_size = 200
    c.train.batch_size = 64
    c.train.epochs = 1
    # XLA's defaults and nn.Conv: with the YNN fusions of
    # steps.XLA_CPU_OPTIONS, or the dots of conv_impl="auto", the numbers
    # depend on how many host devices the process started with (this
    # 8-device process vs a 1-device worker: test losses differ by 1e-8 to
    # 1e-5 relative; README, "Checkpoints, resume, failures").
    c.train.xla_cpu_tuning = False
    c.model.conv_impl = "xla"
    variants = [{"model.norm": n} for n in ("batch", "layer", "none")]
    a = sweep.run(c, sweep=variants, workdir=sys.argv[1] + "/side", devices_per_run=1)
    b = sweep.run(c, sweep=variants, workdir=sys.argv[1] + "/seq", devices_per_run=1, side_by_side=False)
    print(json.dumps([a, b]))
""")


def test_side_by_side_workers_match_sequential_runs(tmp_path, mnist_manual_dir):
  out = _run_8_devices(_SIDE, str(tmp_path), timeout=600)
  side, seq = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["status"] for r in side] == ["completed"] * 3
  for a, b in zip(side, seq):
    assert a["variant"] == b["variant"]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["test_loss"] == b["test_loss"]
  # Each worker saw exactly one device.
  for v in ("norm=batch", "norm=layer", "norm=none"):
    env = json.loads((tmp_path / "side" / v / "env.json").read_text())
    assert env["device_count"] == 1


def test_data_parallel_run_on_two_host_devices_completes(tmp_path,
                                                          mnist_manual_dir):
  """An epoch of many steps on 2 CPU devices with the batch sharded.

  With every step dispatched asynchronously, XLA:CPU aborted this run
  (a device waited 40 s in an all-reduce for a peer queued behind it on the
  shared thread pool); the trainer now finishes each step first on CPU with
  several devices (steps.SpeedOptions.sync_steps).
  """
  from tests.helpers import run_launch
  out = run_launch(
      "--config=configs/mnist.py:smoke", f"--workdir={tmp_path}",
      "--report=false", "--config.dataset.train_size=4096",
      "--config.dataset.test_size=1000", "--config.train.epochs=1",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "completed"
  assert summary["num_devices"] == 2
  assert summary["test_accuracy"] > 0.5
