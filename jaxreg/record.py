"""A run directory's record: what a run of one member has done so far.

`check_prior(config, run_dir)` is the one place that decides what a run
directory already holds: nothing worth keeping ("fresh"), a finished run
("finished": completed or diverged, returned as it is, since training is
deterministic and a diverged run would only diverge again), or checkpoints
of a run of its own ("resumable"). Either of the last two must be a run of
the same config up to results.NON_SEMANTIC_KEYS, else
results.ConfigMismatch names the differing keys before any file is touched.

`RunRecord` owns a member's metrics.jsonl and summary.json through a run's
life: start, each epoch, and the end (diverged, failed, completed). Each
write replaces the whole file atomically (results.write_atomic).
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxreg import checkpoint
from jaxreg import data as data_lib
from jaxreg import metrics as metrics_lib
from jaxreg import results

# Statuses of a run that is over.
FINAL_STATUSES = ("completed", "diverged")
CHECKPOINT_DIR = "checkpoints"
PRIOR_KINDS = ("fresh", "finished", "resumable")


@dataclasses.dataclass(frozen=True)
class Prior:
  """What a run directory held before this run (see check_prior)."""
  kind: str  # One of PRIOR_KINDS.
  summary: dict | None = None  # Its summary.json, if readable.


def check_prior(config: ml_collections.ConfigDict,
                run_dir: str | Path) -> Prior:
  """What `run_dir` holds, after making sure it is a run of `config`.

  Raises:
    results.ConfigMismatch: the directory holds results or checkpoints of
      another config.
  """
  run_dir = Path(run_dir)
  summary = results.read_summary(run_dir)
  status = (summary or {}).get("status")
  if status in FINAL_STATUSES:
    results.check_same_config(run_dir, config.to_dict(), f"a {status} run")
    return Prior("finished", summary)
  if checkpoint.has_checkpoints(run_dir / CHECKPOINT_DIR):
    results.check_same_config(run_dir, config.to_dict(), "checkpoints")
    return Prior("resumable", summary)
  # Nothing worth keeping: a fresh start overwrites it.
  return Prior("fresh", summary)


def check_group_member(config: ml_collections.ConfigDict,
                       run_dir: str | Path) -> None:
  """For a member of a stacked group whose group checkpoint exists: its
  config.json (written when the group started) must be of `config`, or the
  group would resume another config's state (ConfigMismatch)."""
  run_dir = Path(run_dir)
  if (run_dir / "config.json").exists():
    results.check_same_config(run_dir, config.to_dict(),
                              "a member of a checkpointed stacked group")


class RunRecord:
  """The summary and metrics history of one member, kept on disk.

  Attributes:
    run_dir: the member's run directory.
    summary: its summary.json, as last written.
    history: its metrics.jsonl rows.
  """

  def __init__(self, run_dir: str | Path, config: ml_collections.ConfigDict, *,
               variant: str | None = None, overrides: dict | None = None,
               stack: dict | None = None):
    self.run_dir = Path(run_dir)
    self.config = config
    self.summary: dict[str, Any] = {
        "status": "running", "variant": variant, "overrides": overrides or {},
        "dataset": config.dataset.name, "model": config.model.name,
        "norm": config.model.norm, "seed": config.seed,
        "target_accuracy": config.target_accuracy, "epochs_completed": 0,
    }
    if stack is not None:
      self.summary["stack"] = stack
    self.history: list[dict] = []

  def start(self, env: dict) -> None:
    """Writes config.json, env.json and a "running" summary.json (which
    create the directory; only process 0 writes: results.is_writer)."""
    results.write_json(self.run_dir / "config.json", self.config.to_dict())
    results.write_json(self.run_dir / "env.json", env)
    self.write()

  def write(self) -> None:
    results.write_json(self.run_dir / "summary.json", self.summary)

  def set_history(self, history: list[dict]) -> None:
    """Replaces the history (a resumed run's, from its checkpoint): rows of
    epochs after the checkpoint will be computed again."""
    self.history = list(history)
    results.write_jsonl(self.run_dir / "metrics.jsonl", self.history)

  def add_epoch(self, row: dict) -> None:
    self.history.append(row)
    results.write_jsonl(self.run_dir / "metrics.jsonl", self.history)
    self.summary["epochs_completed"] = row["epoch"]

  def diverged(self, epoch: int, loss: float) -> None:
    self.summary.update(
        status="diverged", epochs_completed=epoch - 1,
        error=f"training loss became {loss} in epoch {epoch}")
    self.write()

  def failed(self, error: BaseException) -> None:
    self.summary.update(status="failed",
                        error=f"{type(error).__name__}: {error}")
    self.write()

  def completed(self, ds: data_lib.Dataset, full: dict, train_time: float,
                images_per_epoch: int) -> None:
    """Final metrics per split, time to target, misclassified.npz."""
    last = self.history[-1]
    s = self.summary
    s.update(status="completed", train_loss=last["train_loss"],
             train_accuracy=last["train_accuracy"], train_time_s=train_time,
             images_per_s=images_per_epoch * len(self.history) / train_time)
    for split, m in full.items():
      for k in ("loss", "accuracy", "micro_f1", "macro_f1"):
        s[f"{split}_{k}"] = float(m[k])
      s[f"{split}_per_class_accuracy"] = m["per_class_accuracy"]
      s[f"{split}_confusion"] = m["confusion"]
    if self.config.target_accuracy is not None:
      tta_s, tta_epochs = metrics_lib.time_to_target(
          self.history, self.config.target_accuracy)
      s.update(time_to_target_s=tta_s, epochs_to_target=tta_epochs)
    if "test" in full:
      save_misclassified(self.run_dir / "misclassified.npz", ds,
                         full["test"]["preds"])
    self.write()


def save_misclassified(path: Path, ds: data_lib.Dataset, preds: np.ndarray,
                       n: int = 10) -> None:
  """The first `n` misclassified test images, for the report."""
  wrong = np.flatnonzero(preds != ds.test_labels)[:n]
  buf = io.BytesIO()
  np.savez_compressed(buf, images=ds.test_images[wrong],
                      labels=ds.test_labels[wrong], preds=preds[wrong],
                      class_names=np.asarray(ds.class_names))
  results.write_atomic(path, buf.getvalue())
