"""Seeds as replicas: sweep expansion, the seeded report, resume.

The first tests are on synthetic sweep directories written here by hand (in
results.py's and sweep.py's formats); the last ones train real smoke sweeps
of configs/l1_l2.py on MNIST, and kill one with SIGTERM.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxreg import replicas
from jaxreg import report
from jaxreg import sweep
from jaxreg.report import comparison
from jaxreg.report import stats

from tests import helpers

L1_L2 = "configs/l1_l2.py:smoke"
GRID = ("model.norm_layers", "model.dropout_layers")


# --- Expansion (no JAX) -------------------------------------------------------


def test_replicas_are_named_seeded_variants():
  vs = sweep.make_variants([{"model.norm": "batch"}, {"model.norm": "layer"}])
  reps = sweep.replicate(vs, 3)
  assert [r.name for r in reps] == [
      f"norm={n}/seed={k}" for n in ("batch", "layer") for k in range(3)]
  assert reps[4].overrides == {"model.norm": "layer", "seed": 1}
  assert sweep.replicate(vs, 1) == vs  # One seed: names unchanged.
  single = sweep.replicate(sweep.make_variants([{}]), 2)
  assert [r.name for r in single] == ["seed=0", "seed=1"]
  assert replicas.replica_base("seed=1") == "default"
  assert replicas.count_line([r.name for r in single], 2) == (
      "2 runs (replicas of 1 variant, 2 seeds each)")
  assert replicas.replica_base("norm=batch/seed=2") == "norm=batch"
  # A variant's name selects all its replicas; a replica name just itself.
  picked = sweep.select(reps, ["norm=layer", "norm=batch/seed=0"])
  assert [r.name for r in picked] == ["norm=layer/seed=0", "norm=layer/seed=1",
                                      "norm=layer/seed=2", "norm=batch/seed=0"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_seed_counts_are_refused(bad):
  with pytest.raises(ValueError, match=r"seeds=.* must be an integer >= 1"):
    sweep.replicate(sweep.make_variants([{}]), bad)


def test_a_seed_axis_and_seeds_together_are_refused():
  with pytest.raises(ValueError, match=r"variant seed=0 sets `seed` itself"):
    sweep.replicate(sweep.make_variants([{"seed": 0}, {"seed": 1}]), 2)


def test_dry_run_counts_replicas():
  lines = []
  rows = sweep.run(L1_L2, workdir="unused", seeds=3, dry_run=True,
                   print_fn=lines.append)
  assert len(rows) == 9 and len(lines) == 10
  assert lines[-1] == "9 runs (replicas of 3 variants, 3 seeds each)"
  assert lines[0].startswith("norm=batch,l1=0.0001,weight_decay=0.001/seed=0 ")


def test_seeds_flag_on_the_command_line():
  out = helpers.run_launch(f"--config={L1_L2}", "--seeds=2", "--dry_run")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == (
      "6 runs (replicas of 3 variants, 2 seeds each)")
  bad = helpers.run_launch(f"--config={L1_L2}", "--seeds=0", "--dry_run")
  assert bad.returncode != 0 and "seeds=0 must be an integer >= 1" in bad.stderr


# --- The seeded report on a synthetic 2 x 2 grid ------------------------------

# (norm_layers, dropout_layers) -> test accuracy per seed. (0, 0) is the
# baseline; (0, 1) has the same values in another order (p = 1); (1, 0) is
# higher by 50 standard deviations, (1, 1) lower by as much; (1, 1) has only
# 2 of the 3 seeds asked.
CELLS = {(0, 0): [0.900, 0.901, 0.899], (0, 1): [0.899, 0.900, 0.901],
         (1, 0): [0.950, 0.951, 0.949], (1, 1): [0.850, 0.851]}


def _write_grid(wd: Path) -> Path:
  variants = []
  for (nl, dl), accs in CELLS.items():
    for seed in range(3):
      name = f"norm_layers={nl},dropout_layers={dl}/seed={seed}"
      ov = {"model.norm_layers": nl, "model.dropout_layers": dl,
            "seed": seed}
      variants.append({"name": name, "overrides": ov})
      if seed >= len(accs):
        continue  # Not run yet.
      d = wd / name
      d.mkdir(parents=True)
      acc = accs[seed]
      (d / "config.json").write_text(json.dumps(
          {"name": "grid", "seed": seed, "target_accuracy": 0.9,
           "model": {"norm_layers": nl, "dropout_layers": dl}}))
      hist = [{"epoch": e, "test_accuracy": acc * e / 2,
               "test_loss": 1 - acc * e / 2, "train_loss": 1 - acc * e / 2,
               "train_accuracy": acc * e / 2, "train_time_s": 10.0 * e}
              for e in (1, 2)]
      (d / "metrics.jsonl").write_text(
          "".join(json.dumps(r) + "\n" for r in hist))
      reached = acc >= 0.9
      (d / "summary.json").write_text(json.dumps({
          "status": "completed", "variant": name, "overrides": ov,
          "test_accuracy": acc, "test_loss": 1 - acc,
          "test_macro_f1": acc - 0.01, "train_time_s": 20.0,
          "target_accuracy": 0.9, "epochs_completed": 2,
          "time_to_target_s": 20.0 if reached else None,
          "epochs_to_target": 2 if reached else None}))
  (wd / "sweep.json").write_text(json.dumps({
      "study": "grid", "axes": [*GRID, "seed"], "variants": variants,
      "num_seeds": 3,
      "report": {"heatmaps": [list(GRID)],
                 "baseline": {"model.norm_layers": 0,
                              "model.dropout_layers": 0}}}))
  return wd


def test_seeded_report_tests_against_the_baseline(tmp_path):
  wd = _write_grid(tmp_path / "grid")
  text = report.build_report(wd).read_text()
  assert "## Statistics over seeds" in text
  assert "**Incomplete:** norm_layers=1,dropout_layers=1 has fewer" in text
  rows = {r["variant"]: r for r in csv.DictReader(
      open(wd / comparison.SUMMARY_BY_VARIANT))}
  assert list(rows) == ["norm_layers=0,dropout_layers=0",
                        "norm_layers=0,dropout_layers=1",
                        "norm_layers=1,dropout_layers=0",
                        "norm_layers=1,dropout_layers=1"]
  base, same, up, down = rows.values()
  assert base["baseline"] == "True" and up["baseline_of"] == base["variant"]
  assert (down["seeds_completed"], down["seeds_asked"]) == ("2", "3")
  # Mean and t interval by hand: (1, 0) = 0.95 +- t_{.975,2} * 0.001 / sqrt 3
  # with t_{.975,2} = 4.302653 (table value, 7 digits: tolerance 1e-9).
  assert float(up["test_accuracy_mean"]) == pytest.approx(0.95, abs=1e-12)
  assert float(up["test_accuracy_std"]) == pytest.approx(0.001, abs=1e-12)
  half = 4.302653 * 0.001 / math.sqrt(3)
  assert float(up["test_accuracy_ci_lo"]) == pytest.approx(0.95 - half,
                                                           abs=1e-9)
  verdicts = [r.get("test_accuracy_verdict", "") for r in rows.values()]
  assert verdicts == ["", stats.SAME, stats.BETTER, stats.WORSE]
  assert float(same["test_accuracy_p"]) == pytest.approx(1.0)
  # Holm over the 3 comparisons: the smallest p times 3, capped, monotone.
  ps = [float(r["test_accuracy_p"]) for r in (same, up, down)]
  assert [float(r["test_accuracy_p_holm"]) for r in (same, up, down)] == (
      pytest.approx(stats.holm(ps)))
  # Time to target: (1, 1) never reached it, so it is censored.
  assert down["time_to_target_s_median"] == "never"
  assert down["time_to_target_s_reached"] == "0"
  assert "| norm_layers=1,dropout_layers=0 | 3/3 |" in text
  assert "| norm_layers=1,dropout_layers=1 | 2/3 (incomplete) |" in text
  assert "not distinguishable" in text and "better" in text
  for name in ("curves", "forest", "heatmaps"):
    assert f"](figures/{name}.png)" in text
    assert (wd / "figures" / f"{name}.png").stat().st_size > 10_000
  assert "hatched cells marked ≈ are not distinguishable" in text


def test_a_baseline_that_names_no_setting_is_a_note(tmp_path):
  wd = _write_grid(tmp_path / "grid")
  spec = json.loads((wd / "sweep.json").read_text())
  spec["report"]["baseline"] = {"model.norm_layers": 7}
  (wd / "sweep.json").write_text(json.dumps(spec))
  text = report.build_report(wd).read_text()
  assert "baseline {'model.norm_layers': 7} matches no setting" in text
  assert "forest.png" not in text
  assert not (wd / "figures" / "forest.png").exists()


# --- Real sweeps ----------------------------------------------------------------


def _summary(d: Path) -> dict:
  return json.loads((d / "summary.json").read_text())


def test_seeded_smoke_sweep_half_finished_then_resumed(tmp_path,
                                                       mnist_manual_dir):
  over = {"train.epochs": 1, "dataset.train_size": 512,
          "dataset.test_size": 200}
  # All but the last replica first (one stacked program per variant: the
  # fewest compiles that leave a variant short of seeds).
  names = [v.name for v in sweep.replicate(
      sweep.resolve(L1_L2).variants, 3)]
  first = names[:-1]
  rows = sweep.run(L1_L2, workdir=tmp_path, overrides=over, seeds=3,
                   stack=True, variants=first, print_fn=lambda s: None)
  assert [r["status"] for r in rows] == ["completed"] * 8
  text = report.build_report(tmp_path).read_text()
  assert "**Incomplete:**" in text and "2/3 (incomplete)" in text
  table = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert [r["status"] for r in table] == ["completed"] * 8 + ["pending"]
  mtimes = {n: (tmp_path / n / "summary.json").stat().st_mtime_ns
            for n in first}
  # The whole sweep: the finished replicas are skipped, the rest run.
  rows = sweep.run(L1_L2, workdir=tmp_path, overrides=over, seeds=3,
                   stack=True, print_fn=lambda s: None)
  assert [r["variant"] for r in rows] == names
  assert [r["status"] for r in rows] == ["completed"] * 9
  assert mtimes == {n: (tmp_path / n / "summary.json").stat().st_mtime_ns
                    for n in first}
  for n in names:  # <variant>/seed=K/, trained with seed K.
    assert _summary(tmp_path / n)["seed"] == int(n[-1])
  assert len({_summary(tmp_path / n)["test_loss"] for n in names}) == 9
  table = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert len(table) == 9 and [r["seed"] for r in table] == ["0", "1", "2"] * 3
  text = report.build_report(tmp_path).read_text()
  assert "**Incomplete:**" not in text
  assert "norm=group,num_groups=2,l1=0.0001,weight_decay=0 (baseline)" in text
  by = list(csv.DictReader(open(tmp_path / comparison.SUMMARY_BY_VARIANT)))
  assert len(by) == 3 and all(r["seeds_completed"] == "3" for r in by)
  accs = [float(r["test_accuracy"]) for r in table[:3]]
  assert float(by[0]["test_accuracy_mean"]) == pytest.approx(
      np.mean(accs), rel=1e-12)
  assert by[0]["test_accuracy_verdict"] in (stats.BETTER, stats.WORSE,
                                            stats.SAME)


def test_killed_seeded_sweep_resumes(tmp_path, mnist_manual_dir):
  args = [sys.executable, "launch.py", f"--config={L1_L2}", "--seeds=2",
          "--stack", "--noreport", f"--workdir={tmp_path}",
          "--config.train.epochs=3", "--config.dataset.test_size=200",
          "--variants=norm=layer,l1=0,weight_decay=0.001"]
  proc = subprocess.Popen(args, cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = tmp_path / "norm=layer,l1=0,weight_decay=0.001" / "seed=0"
  deadline = time.time() + 240
  # Kill it once the group has finished an epoch (and checkpointed it).
  while time.time() < deadline and proc.poll() is None:
    m = first / "metrics.jsonl"
    if m.exists() and m.read_text().count("\n") >= 1:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert _summary(first)["status"] == "running"
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True,
                       text=True, timeout=240,
                       env={**os.environ})
  assert out.returncode == 0, out.stderr[-3000:]
  for k in (0, 1):
    s = _summary(first.parent / f"seed={k}")
    assert s["status"] == "completed" and s["epochs_completed"] == 3
    assert s["resumed_from_step"] > 0
