"""Tests for jaxreg.report on synthetic sweep and run directories.

The directories are written here by hand, in the formats of results.py and
sweep.py, so the report is checked against the file formats rather than
against the code that writes them.
"""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from jaxreg import config as config_lib
from jaxreg import report
from jaxreg import results
from jaxreg.report import loading
from jaxreg.report.figures import heatmaps

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
         "horse", "ship", "truck"]
AXES = ["model.norm_layers", "model.dropout_layers", "seed"]
PAIR = ("model.norm_layers", "model.dropout_layers")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TARGET = 0.87
EPOCHS = 4


def _write_json(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2))


def _history(final_acc: float, seconds_per_epoch: float, features: bool):
  rows = []
  for e in range(1, EPOCHS + 1):
    frac = e / EPOCHS
    acc = final_acc * (0.6 + 0.4 * frac)
    row = {
        "epoch": e, "step": 100 * e, "lr": 0.1 * (1 - frac),
        "train_loss": 2.0 * (1.5 - final_acc) / (e + 1),
        "train_accuracy": min(1.0, acc + 0.03),
        "test_loss": 2.2 * (1.5 - final_acc) / (e + 1) + 0.1,
        "test_accuracy": acc,
        "test_micro_f1": acc, "test_macro_f1": acc - 0.01,
        "epoch_time_s": seconds_per_epoch,
        "train_time_s": seconds_per_epoch * e, "images_per_s": 6400.0,
    }
    if features:
      w = 1.0 + 10 * (final_acc - 0.8)
      row["features"] = {"layer": "stage1/block0/norm1", "q01": -2.0 * w / e,
                         "q20": -0.5 * w / e, "q80": 0.5 + 0.1 * w * e,
                         "q99": 2.0 + 0.3 * w * e}
    rows.append(row)
  return rows


def _confusion(acc: float, n_per_class: int = 100) -> list[list[int]]:
  k = len(CIFAR)
  conf = np.zeros((k, k), int)
  for i in range(k):
    right = int(round(acc * n_per_class)) - (i % 3)
    conf[i, i] = right
    conf[i, (i + 1) % k] = n_per_class - right
  return conf.tolist()


def _images(seed: int, n: int = 10) -> np.ndarray:
  # Smooth colour gradients plus noise: clearly not one flat colour.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:32, 0:32]
  imgs = []
  for i in range(n):
    base = np.stack([xx * 8, yy * 8, (xx + yy) * 4 + 25 * i], -1) % 256
    imgs.append(np.clip(base + rng.integers(0, 40, base.shape), 0, 255))
  return np.asarray(imgs, np.uint8)


def _write_run(d: Path, name: str, overrides: dict, status: str,
               final_acc: float | None = None, sec: float = 5.0,
               error: str | None = None, features: bool = True) -> dict:
  """Writes one run directory; returns its summary."""
  _write_json(d / "config.json", {
      "name": "s1_synthetic", "seed": overrides.get("seed", 0),
      "dataset": {"name": "cifar10"}, "target_accuracy": TARGET,
      "model": {"name": "resnet50", "norm": "batch",
                "norm_layers": overrides.get("model.norm_layers", 3),
                "dropout_layers": overrides.get("model.dropout_layers", 0)}})
  _write_json(d / "env.json", {
      "python": "3.11.2", "jax": "0.10.2", "jaxlib": "0.10.2",
      "flax": "0.12.8", "optax": "0.2.8", "backend": "cpu",
      "devices": ["TFRT_CPU_0"], "device_count": 1, "git_revision": "abc123",
      "hostname": "test", "time": "2025-01-01T00:00:00"})
  summary = {"status": status, "variant": name, "overrides": overrides,
             "dataset": "cifar10", "model": "resnet50", "norm": "batch",
             "seed": overrides.get("seed", 0), "target_accuracy": TARGET}
  if status != "completed":
    summary.update(error=error, epochs_completed=0, test_loss="nan")
    _write_json(d / "summary.json", summary)
    return summary
  hist = _history(final_acc, sec, features)
  (d / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in hist))
  reached = [r for r in hist if r["test_accuracy"] >= TARGET]
  last = hist[-1]
  conf = _confusion(final_acc)
  summary.update(
      epochs_completed=EPOCHS, test_accuracy=last["test_accuracy"],
      test_loss=last["test_loss"], test_micro_f1=last["test_micro_f1"],
      test_macro_f1=last["test_macro_f1"],
      test_per_class_accuracy=[r[i] / 100 for i, r in enumerate(conf)],
      test_confusion=conf, train_loss=last["train_loss"],
      train_accuracy=last["train_accuracy"], train_time_s=sec * EPOCHS,
      compile_time_s=12.5, num_params=23_520_842, images_per_s=6400.0,
      time_to_target_s=reached[0]["train_time_s"] if reached else None,
      epochs_to_target=reached[0]["epoch"] if reached else None)
  _write_json(d / "summary.json", summary)
  labels = np.arange(10) % 10
  np.savez_compressed(d / "misclassified.npz",
                      images=_images(len(name)), labels=labels,
                      preds=(labels + 1) % 10, class_names=np.asarray(CIFAR))
  return summary


# (name, norm_layers, dropout_layers, seed, status, final accuracy, s/epoch)
VARIANTS = [
    ("n1_d0_seed0", 1, 0, 0, "completed", 0.90, 5.0),
    ("n1_d0_seed1", 1, 0, 1, "completed", 0.92, 6.0),
    ("n2_d1_seed0", 2, 1, 0, "completed", 0.84, 4.0),
    ("n2_d1_seed1", 2, 1, 1, "completed", 0.86, 4.0),
    ("n2_d0_seed0", 2, 0, 0, "failed", None, 0.0),
    ("n3_d1_seed0", 3, 1, 0, "missing", None, 0.0),  # no directory at all
]
ERROR = "RuntimeError: RESOURCE_EXHAUSTED: out of memory while allocating"


def _write_sweep(wd: Path, report_spec: dict | None) -> Path:
  """The VARIANTS sweep; `report_spec` is sweep.json's "report" entry (what
  the study file's get_report() returned), None for a study without one."""
  variants, rows = [], []
  for name, nl, dl, seed, status, acc, sec in VARIANTS:
    ov = {"model.norm_layers": nl, "model.dropout_layers": dl, "seed": seed}
    variants.append({"name": name, "overrides": ov})
    if status == "missing":
      continue
    s = _write_run(wd / name, name, ov, status, acc, sec,
                   error=ERROR if status == "failed" else None)
    rows.append({"variant": name, "status": status, **ov,
                 **{k: s.get(k) for k in results.SUMMARY_COLUMNS}})
  spec = {"study": "s1_synthetic", "config": "configs/s1.py", "axes": AXES,
          "variants": variants}
  if report_spec is not None:
    spec["report"] = report_spec
  _write_json(wd / "sweep.json", spec)
  cols = ["variant", "status", *AXES, *results.SUMMARY_COLUMNS]
  with open(wd / "summary.csv", "w", newline="") as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
  return wd


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
  return _write_sweep(tmp_path / "s1", {"heatmaps": [list(PAIR)]})


def _check_png(path: Path, min_kb: float = 8.0) -> None:
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", path
  assert len(data) > min_kb * 1024, (path, len(data))
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
  flat = img[..., :3].reshape(-1, 3)
  assert flat.std(axis=0).max() > 0.05, f"{path} is nearly one flat colour"
  assert len(np.unique(flat[::7], axis=0)) > 20, f"{path} has too few colours"


def _table_row(text: str, first_cell: str) -> str:
  rows = [l for l in text.splitlines() if l.startswith(f"| {first_cell} |")]
  assert rows, f"no table row starting with {first_cell!r}"
  return rows[0]


def test_sweep_report(sweep_dir: Path):
  out = report.build_report(sweep_dir)
  assert out == sweep_dir / "report.md"
  text = out.read_text()
  assert text.startswith("# s1_synthetic")

  # Every variant, including the failed and the missing one, is in a table.
  for name, *_ in VARIANTS:
    assert f"| {name} |" in text, name
  failed = _table_row(text, "n2_d0_seed0")
  assert "| failed |" in failed and "RESOURCE_EXHAUSTED" in failed
  assert "| missing |" in _table_row(text, "n3_d1_seed0")

  # Seeded settings: mean ± sample std, computed here by hand.
  #   accuracy 90, 92 -> 91.00 ± sqrt(2) = 1.41
  #   train time 20, 24 s -> 22.0 ± 2.8
  #   time to 87%: both seeds reach it at epoch 4 (20 s and 24 s) -> 22.0 ± 2.8
  g1 = _table_row(text, "n1_d0")
  assert "| 91.00 ± 1.41 |" in g1
  assert "| 22.0 ± 2.8 |" in g1
  assert "| 2/2 |" in g1
  # The second setting peaks at 84-86% and never reaches 87%.
  g2 = _table_row(text, "n2_d1")
  assert "| 85.00 ± 1.41 |" in g2 and "| never |" in g2
  # The failed single-seed setting shows its status, no numbers.
  assert "| failed |" in _table_row(text, "n2_d0")
  # Best: highest mean test accuracy among completed settings.
  best = text.split("## Best variant")[1].split("##")[0]
  assert "**n1_d0**" in best and "91.00 ± 1.41%" in best

  figures = {p.name for p in (sweep_dir / "figures").iterdir()}
  assert figures == {"curves.png", "heatmaps.png", "misclassified.png",
                     "features.png", "confusion.png"}
  for name in sorted(figures):
    _check_png(sweep_dir / "figures" / name)
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert sorted(Path(l).name for l in links) == sorted(figures)
  for l in links:
    assert (out.parent / l).is_file(), l
  assert "## Notes" in text and "run directory missing" in text
  assert "figure" not in text.split("## Notes")[1]  # no figure failed


def test_heatmap_rows_say_what_they_show(sweep_dir: Path, monkeypatch):
  groups = report.group_runs(report.load_study(sweep_dir))
  h = sweep_dir / "h.png"
  _, how = report.plot_heatmaps(groups, AXES, PAIR, h, "t")
  assert how == "cells are means over seeds"
  # With a third axis the rows are its values, or the best over it when
  # there are more combinations than rows.
  for g, extra in zip(groups, [0.2, 0.5, 0.8, 0.2]):
    g.settings["model.dropout_rate"] = extra
  axes = AXES + ["model.dropout_rate"]
  _, how = report.plot_heatmaps(groups, axes, PAIR, h, "t")
  assert how.startswith("one row per combination of dropout_rate")
  monkeypatch.setattr(heatmaps, "MAX_HEATMAP_ROWS", 2)
  _, how = report.plot_heatmaps(groups, axes, PAIR, h, "t")
  assert how.startswith("each cell shows the best value over dropout_rate")
  _check_png(h)
  # An axis the sweep does not vary: nothing to draw.
  assert report.plot_heatmaps(groups, AXES, ("model.width", PAIR[1]), h,
                              "t") == (None, "")


def _figure_names(wd: Path) -> set[str]:
  return {p.name for p in (wd / "figures").iterdir()}


def test_heatmaps_come_from_the_study_declaration(tmp_path: Path):
  # No declaration: no heatmap, even over the axes that once were built in.
  wd = _write_sweep(tmp_path / "none", None)
  text = report.build_report(wd).read_text()
  assert "heatmap" not in " ".join(_figure_names(wd))
  assert "### Norm layers x dropout layers" not in text
  # Several pairs: one file each, named after the axes. A pair with an axis
  # this sweep does not vary (a smaller mode of the study) is skipped
  # quietly; a misspelled one is a note.
  wd = _write_sweep(tmp_path / "two", {"heatmaps": [
      list(PAIR), [PAIR[1], PAIR[0]], ["model.name", PAIR[0]],
      ["model.norm_layrs", PAIR[1]]]})
  text = report.build_report(wd).read_text()
  maps = sorted(n for n in _figure_names(wd) if "heatmap" in n)
  assert maps == ["heatmap_dropout_layers_x_norm_layers.png",
                  "heatmap_norm_layers_x_dropout_layers.png"]
  for name in maps:
    _check_png(wd / "figures" / name)
    assert f"(figures/{name})" in text
  assert "### Norm layers x dropout layers" in text
  assert "### Dropout layers x norm layers" in text
  assert ("over `model.dropout_layers` x `model.norm_layers`: cells are "
          "means over seeds." in text)
  notes = text.split("## Notes")[1]
  assert "heatmap model.norm_layrs x model.dropout_layers not drawn" in notes
  assert "model.name" not in notes
  # A malformed declaration is a note, and the rest of the report stands.
  wd = _write_sweep(tmp_path / "bad", {"heatmaps": ["model.norm_layers"]})
  text = report.build_report(wd).read_text()
  assert "report.heatmaps is not a list of [row axis, column axis] pairs" in (
      text)
  assert "heatmap" not in " ".join(_figure_names(wd))
  assert "curves.png" in _figure_names(wd)


def test_a_broken_figure_is_a_note(sweep_dir: Path, monkeypatch):
  def boom(*args, **kwargs):
    raise RuntimeError("boom")
  monkeypatch.setattr(heatmaps, "plot_heatmaps", boom)
  text = report.build_report(sweep_dir).read_text()
  assert ("figure heatmaps (model.norm_layers x model.dropout_layers) "
          "failed: RuntimeError: boom") in text
  assert "![Training curves](figures/curves.png)" in text
  assert "### Confusion matrix" in text and "## Figures" in text


def test_declared_heatmaps_are_axes_of_the_study():
  declaring = []
  for path in sorted(CONFIGS.glob("*.py")):
    module = config_lib.load_config_file(str(path))[0]
    if not hasattr(module, "get_report"):
      continue
    declaring.append(path.name)
    declared = module.get_report()
    json.dumps(declared)  # it goes into sweep.json
    assert set(declared) <= {"heatmaps", "baseline", "baseline_within"}, (
        path.name)
    keys = {k for v in module.get_sweep() for k in v}
    # A declared baseline is one setting of the study (per baseline_within).
    if "baseline" in declared:
      base = declared["baseline"]
      within = declared.get("baseline_within", [])
      assert set(base) | set(within) <= keys, (path.name, base, within)
      hits = [v for v in module.get_sweep()
              if all(v.get(k) == x for k, x in base.items())]
      strata = [tuple(v.get(k) for k in within) for v in hits]
      assert hits and len(set(strata)) == len(strata), (path.name, hits)
    for pair in declared.get("heatmaps", []):
      assert isinstance(pair, list) and len(pair) == 2, (path.name, pair)
      assert set(pair) <= keys, (path.name, pair, sorted(keys))
  assert {"agc.py", "bn_dropout.py", "l1_l2.py", "norms.py"} <= set(declaring)


def test_single_run_directory_and_cli(tmp_path: Path, capsys):
  wd = tmp_path / "run"
  _write_run(wd, "run", {}, "completed", 0.98, 3.0, features=False)
  out_md = tmp_path / "elsewhere" / "r.md"
  assert report.main([str(wd), "--out", str(out_md)]) == 0
  assert capsys.readouterr().out.strip() == str(out_md)
  text = out_md.read_text()
  assert text.startswith("# s1_synthetic") and "Single run" in text
  row = _table_row(text, "run")
  assert "| completed |" in row and "| 98.00 |" in row
  # Time to 87%: accuracy 0.98 * 0.8 = 78.4% at epoch 2, 0.98 * 0.9 = 88.2%
  # at epoch 3, after 3 * 3 s.
  assert "| 9.0 | 3 |" in row
  figures = {p.name for p in (wd / "figures").iterdir()}
  assert figures == {"curves.png", "misclassified.png", "confusion.png"}
  for name in figures:
    _check_png(wd / "figures" / name)
  for l in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
    assert l.startswith("../run/figures/") and (out_md.parent / l).is_file()


def test_running_and_failed_single_run(tmp_path: Path):
  wd = tmp_path / "failed"
  _write_run(wd, "failed", {}, "failed", error="ValueError: bad config")
  text = report.build_report(wd).read_text()
  assert "| failed |" in text and "ValueError: bad config" in text
  assert "No run completed" in text

  # A run in progress: the table shows its latest epoch, and the target is
  # "not yet" reached rather than "never".
  wd = tmp_path / "running"
  _write_run(wd, "running", {}, "completed", 0.9, 2.0, features=False)
  hist = _history(0.9, 2.0, features=False)[:2]  # 63% and 72%
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                            for r in hist))
  _write_json(wd / "summary.json", {"status": "running", "variant": "running",
                                    "target_accuracy": TARGET,
                                    "epochs_completed": 2})
  text = report.build_report(wd).read_text()
  row = _table_row(text, "running")
  assert "| running | 72.00 |" in row and "| not yet |" in row
  assert (wd / "figures" / "curves.png").is_file()


def test_corrupt_files_become_notes(sweep_dir: Path):
  (sweep_dir / "n2_d1_seed1" / "summary.json").write_text('{"status": "comp')
  with open(sweep_dir / "n1_d0_seed0" / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 5, "train_lo\n')
  text = report.build_report(sweep_dir).read_text()
  # summary.csv still records the run, so its numbers survive.
  assert "| completed | 86.00 |" in _table_row(text, "n2_d1_seed1")
  assert "summary.json unreadable" in text
  assert "metrics.jsonl line 5 is not JSON; skipped" in text
  # Without that record the run is "unreadable" and leaves the mean.
  rows = (sweep_dir / "summary.csv").read_text().splitlines()
  (sweep_dir / "summary.csv").write_text(
      "\n".join(r for r in rows if not r.startswith("n2_d1_seed1")) + "\n")
  text = report.build_report(sweep_dir).read_text()
  assert "| unreadable |" in _table_row(text, "n2_d1_seed1")
  g = _table_row(text, "n2_d1")
  assert "| 1/2 |" in g and "| 84.00 |" in g  # one seed: no ± part


def test_not_a_run_directory(tmp_path: Path):
  with pytest.raises(ValueError, match="neither sweep.json"):
    report.build_report(tmp_path)
  with pytest.raises(ValueError, match="not a directory"):
    report.build_report(tmp_path / "nope")


def test_render_table():
  rows = [{"variant": "a|b", "acc": 0.91234, "n": 3},
          {"variant": "c", "acc": float("nan"), "note": "x\ny"}]
  assert report.render_table(rows) == "\n".join([
      "| variant | acc | n | note |",
      "| --- | ---: | ---: | --- |",
      "| a\\|b | 0.9123 | 3 | - |",
      "| c | - | - | x y |",
  ])
  assert (report.render_table(rows, columns=["n"]) ==
          "| n |\n| ---: |\n| 3 |\n| - |")
  assert report.render_table([]) == ""
  assert math.isnan(loading.to_float("nan")) and loading.to_float("") is None


def test_python_dash_m(tmp_path: Path):
  wd = tmp_path / "run"
  _write_run(wd, "run", {}, "completed", 0.98, 3.0, features=False)
  out = subprocess.run([sys.executable, "-m", "jaxreg.report", str(wd)],
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == str(wd / "report.md")
  assert (wd / "report.md").read_text().startswith("# s1_synthetic")
  bad = subprocess.run([sys.executable, "-m", "jaxreg.report",
                        str(tmp_path / "nope")], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "not a directory" in bad.stderr
