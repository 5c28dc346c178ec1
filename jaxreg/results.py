"""The run directory: what every run leaves behind, written atomically.

Layout (see README): config.json, env.json, metrics.jsonl, summary.json,
misclassified.npz, checkpoints/. Every file is written to a temporary name
and renamed, so a run killed at any moment never leaves a half-written file.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# Columns of a sweep's summary.csv after the variant, status and axis columns
# (sweep.write_table writes them; report reads them back).
SUMMARY_COLUMNS = (
    "test_accuracy", "test_loss", "test_macro_f1", "val_accuracy",
    "train_time_s", "compile_time_s", "time_to_target_s", "epochs_to_target",
    "epochs_completed", "num_params", "error")


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else str(x)  # JSON has no nan/inf.
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # jax arrays
    return _jsonable(np.asarray(x))
  return x


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _umask()


def is_writer() -> bool:
  """With several JAX processes (one run over several hosts), only process 0
  writes results; the others compute the same numbers."""
  import sys
  jax = sys.modules.get("jax")  # Never import JAX just to ask.
  return jax is None or jax.process_index() == 0



def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` via a temporary file in the same directory."""
  if not is_writer():
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    # mkstemp makes 0600 files; results are meant to be shared.
    os.chmod(tmp, 0o666 & ~_UMASK)
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
  """Rewrites the whole file: a few KB per run, and never a broken last line."""
  write_atomic(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_summary(run_dir: str | os.PathLike) -> dict | None:
  """`run_dir`/summary.json, or None when it is missing or unreadable."""
  try:
    return read_json(Path(run_dir) / "summary.json")
  except (OSError, ValueError):
    return None


def git_revision() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=5,
                         cwd=Path(__file__).resolve().parent)
    rev = out.stdout.strip()
    if out.returncode or not rev:
      return None
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"],
                           capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent).stdout.strip()
    return rev + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def environment() -> dict:
  """Versions, devices and revision: what a reader needs to trust a number."""
  import flax
  import jax
  import jaxlib
  import optax

  import jaxreg
  from jaxreg import hostmem
  host_tuning = hostmem.state() or {
      "enabled": False, "note": "hostmem.tune() was not called in this "
      "process (runtime.setup() does it)"}
  devices = jax.devices()
  return {
      "jaxreg": jaxreg.__version__,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "host_tuning": host_tuning,
      "git_revision": git_revision(),
      "hostname": socket.gethostname(),
      "platform": platform.platform(),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }


# Keys that do not change what a run computes: a run may resume or be
# skipped across them (e.g. on another number of devices, or checkpointing
# more often after a preemption).
NON_SEMANTIC_KEYS = frozenset({
    "train.num_devices", "train.log_every_s", "checkpoint.every_epochs",
    "checkpoint.keep", "checkpoint.keep_best", "train.tensorboard",
    "train.log_every_steps", "train.profile_steps",
    # How many replicas a sweep asks for: a replica's own seed is `seed`.
    "num_seeds"})


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def flatten_config(config: dict) -> dict:
  """A config dict as {dotted key: JSON value}."""
  return _flatten(_jsonable(config))


def config_diff(old: dict, new: dict,
                ignore: frozenset[str] = NON_SEMANTIC_KEYS) -> list[str]:
  """Dotted keys whose values differ between two config dicts."""
  a, b = flatten_config(old), flatten_config(new)
  return sorted(k for k in set(a) | set(b)
                if k not in ignore and a.get(k) != b.get(k))


class ConfigMismatch(ValueError):
  """A run directory holds results of a different config."""


def check_same_config(run_dir: str | os.PathLike, config: dict,
                      what: str = "results") -> None:
  """Raises ConfigMismatch, naming the differing keys, unless `config`
  equals `run_dir`/config.json up to NON_SEMANTIC_KEYS.

  `what` says what the directory holds ("checkpoints", "a completed run").
  """
  path = Path(run_dir) / "config.json"
  try:
    old = read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigMismatch(
        f"{run_dir} holds {what} but its config.json is unreadable ({e}); "
        "use another --workdir or delete it") from None
  diff = config_diff(old, config)
  if diff:
    a, b = flatten_config(old), flatten_config(config)
    missing = "<absent>"
    changes = "; ".join(f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
                        for k in diff)
    raise ConfigMismatch(
        f"{run_dir} holds {what} of a different config, which differs in "
        f"{', '.join(diff)} ({changes}); relaunch with the same config, use "
        "another --workdir, or delete it")
