"""Profile: where the compiled train step of a study spends its time, per op.

Compiles jaxreg's own train step (steps.Steps, the trainer's compiler
options) for a study's configuration on random images of the dataset's
shape (the step's speed does not depend on the pixels), runs it under
`jax.profiler` and reads the per-thunk events of XLA:CPU's runtime (every
top-level HLO instruction of the step is one thunk, named after it) from the
Perfetto trace. Each instruction is put in a category from the optimized
HLO (`Compiled.as_text()`): its opcode, and the JAX op names of it and of
everything fused into it:

  conv forward / input-grad / weight-grad   convolution thunks; backward
      ones come from `transpose(jvp(...))`, the weight gradient is the one
      whose output is a kernel (XLA:CPU writes it as a convolution with the
      activation's spatial size as its window)
  batch norm          fusions from a `norm` module, forward or backward
  model elementwise   the other fusions of the model (ReLU, residual adds,
      pooling, the classifier)
  copies/transposes   copy and transpose fusions (layout changes for the
      convolutions)
  broadcasts          broadcasts XLA materialised as arrays
  data                gathering the batch, augmentation, PRNG
  optimizer, loss     everything else (the optax chain, loss, metrics)

Thunks may run two at a time (XLA:CPU's thunk executor runs independent
ones concurrently), so shares are of the summed op time; the step's wall
time is printed beside it.

What a trace cannot show: XLA:CPU's convolutions (Eigen) run
asynchronously on the intra-op thread pool, and their thunk's event ends
when the work is handed over, so the conv rows are the launch only (13
forward convolutions of ResNet-14 "take" 1.6 ms; alone they take 32 ms,
bench/conv_layers.py). The sum of ops is therefore about half the wall
time. What the convolutions cost inside the step is measured by leaving
them out: `bench/step_variants.py --variant='no conv grads:drop=dw+dx'`.

  python bench/profile_step.py                       # S4: ResNet-14, batch 128
  python bench/profile_step.py --study=resnet9
  python bench/profile_step.py --override=model.conv_impl=xla
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

jax = benchlib.jax
np = benchlib.np

_STUDY = flags.DEFINE_enum("study", "resnet14", list(benchlib.RESNET_STUDIES),
                           "benchlib.RESNET_STUDIES entry.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "More config "
                                      "overrides, key=value.")
_XLA = flags.DEFINE_multi_string(
    "xla", [], "XLA compiler options replacing the trainer's, key=value "
    "('default' alone: XLA's defaults).")
_STEPS = flags.DEFINE_integer("steps", 5, "Traced steps (after 3 warm-up).")
_LAYERS = flags.DEFINE_bool("layers", True, "Also print conv time per layer "
                            "shape.")

CATEGORIES = ("conv forward", "conv input-grad", "conv weight-grad",
              "batch norm", "model elementwise", "copies/transposes",
              "broadcasts", "data", "optimizer, loss")

_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")
_DIMS = re.compile(r"\[([\d,]*)\]")


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  shape: tuple[int, ...]
  op_names: list[str]
  calls: list[str]
  window: tuple[int, int] | None
  line: str


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, list[Instr]],
                                  str]:
  """(instructions by name, computations' instructions, entry name)."""
  instrs, comps, entry, cur = {}, collections.defaultdict(list), "", None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      cur = m.group(2)
      if m.group(1):
        entry = cur
      continue
    m = _INSTR.match(line)
    if not m or cur is None:
      continue
    dims = _DIMS.search(m.group(2))
    shape = tuple(int(d) for d in dims.group(1).split(",") if d) if dims \
        else ()
    w = _WINDOW.search(line)
    ins = Instr(m.group(1), m.group(3), shape, _OPNAME.findall(line),
                _CALLS.findall(line),
                (int(w.group(1)), int(w.group(2))) if w else None, line)
    instrs[ins.name] = ins
    comps[cur].append(ins)
  return instrs, comps, entry


def _fused(ins: Instr, comps: dict) -> list[Instr]:
  out, todo = [], list(ins.calls)
  while todo:
    for sub in comps.get(todo.pop(), []):
      out.append(sub)
      todo.extend(sub.calls)
  return out


def categorize(ins: Instr, comps: dict, batch: int) -> str:
  inner = _fused(ins, comps)
  convs = [i for i in [ins] + inner if i.opcode == "convolution"]
  names = ins.op_names + [n for i in inner for n in i.op_names]
  if convs:
    c = convs[0]
    backward = not c.op_names or any("transpose(" in n for n in c.op_names)
    if not backward:
      return "conv forward"
    # The weight gradient's window is the activation (bigger than a
    # kernel); the input gradient keeps the batch as its leading axis.
    big_window = c.window is not None and min(c.window) > 3
    if big_window or (c.shape and c.shape[0] != batch):
      return "conv weight-grad"
    return "conv input-grad"
  if ins.opcode in ("copy", "transpose") or ins.name.startswith(
      ("transpose_copy", "copy")):
    return "copies/transposes"
  if ins.opcode == "broadcast" or ins.name.startswith("wrapped_broadcast"):
    return "broadcasts"
  if any(re.search(r"/(\w+_)?norm\d*/", n) for n in names):
    return "batch norm"
  if any("jvp(" in n for n in names):
    return "model elementwise"
  if ins.opcode == "gather" or any(
      k in n for n in names for k in ("augment", "randint", "threefry",
                                      "gather", "random", "bernoulli")):
    return "data"
  return "optimizer, loss"


def _layer(ins: Instr, comps: dict) -> str:
  c = [i for i in [ins] + _fused(ins, comps) if i.opcode == "convolution"][0]
  w = f"{c.window[0]}x{c.window[1]}" if c.window else "?"
  extra = " lhs_dilate" if "lhs_dilate" in c.line else ""
  extra += " stride2" if "stride=2x2" in c.line else ""
  return f"out {list(c.shape)} window {w}{extra}"


def trace(compiled, args: tuple, steps: int) -> tuple[list[dict], float]:
  """Runs `steps` traced steps; returns the thunk events and the median wall
  ms per step (timed apart, untraced)."""
  state = args[0]
  rest = args[1:]
  for i in range(3):
    state, _ = compiled(state, *rest[:3], np.int32(i), rest[4])
  jax.block_until_ready(state)
  walls = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, _ = compiled(state, *rest[:3], np.int32(i), rest[4])
    jax.block_until_ready(state)
    walls.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for i in range(steps):
      state, _ = compiled(state, *rest[:3], np.int32(i), rest[4])
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get(
      "args", {})]
  return ops, 1e3 * benchlib.median(walls)


def main(argv):
  del argv
  print(benchlib.environment())
  config = benchlib.resnet_config(_STUDY.value, _OVERRIDE.value)
  shape = (28, 28, 1)
  batch = config.train.batch_size
  ds = benchlib.synthetic_dataset(shape, 10, 16 * batch)
  loop = benchlib.TrainerLoop(config, ds)
  steps = loop.engine.steps
  if _XLA.value:
    opts = {} if _XLA.value == ["default"] else dict(
        kv.split("=", 1) for kv in _XLA.value)
    steps.speed = dataclasses.replace(steps.speed, compiler_options=opts)
  c = benchlib.compiled_train_step(steps)
  compile_s = c["compile_s"]
  load0 = benchlib.load_avg()
  ops, wall_ms = trace(c["train"], (c["state"], c["images"], c["labels"],
                                    c["perm"], None, c["rng"]), _STEPS.value)
  load1 = benchlib.load_avg()
  instrs, comps, entry = parse_hlo(c["train"].as_text())
  top = {i.name for i in comps[entry]}
  n = _STEPS.value
  per_cat = collections.Counter()
  per_op = collections.Counter()
  for e in ops:
    name = e["args"]["hlo_op"]
    if name in top:  # Nested thunks (while bodies) count in their parent.
      per_op[name] += e["dur"] / 1e3 / n
  for name, ms in per_op.items():
    per_cat[categorize(instrs[name], comps, batch)] += ms
  total = sum(per_cat.values())
  print(f"{config.model.name} (depth {config.model.depth}) norm="
        f"{config.model.norm}, batch {batch}, image {shape}; compiler "
        f"options {steps.speed.compiler_options or 'XLA defaults'}; compile "
        f"{compile_s:.1f} s")
  benchlib.print_table(
      ["category", "ms/step", "share", "ops"],
      [[c, per_cat[c], f"{100 * per_cat[c] / total:.1f}%",
        sum(1 for o in per_op if categorize(instrs[o], comps, batch) == c)]
       for c in CATEGORIES] + [["sum of ops", total, "100%", len(per_op)],
                               ["wall per step (untraced)", wall_ms, "", ""]],
      f"Train step by op category ({n} traced steps; load {load0:.2f} -> "
      f"{load1:.2f})")
  print("Convolution rows are their launch only (Eigen runs them "
        "asynchronously, untraced): their cost inside the step is "
        "bench/step_variants.py's drop=dw / drop=dx.")
  if _LAYERS.value:
    per_layer = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in per_op.items():
      cat = categorize(instrs[name], comps, batch)
      if cat.startswith("conv"):
        key = (cat, _layer(instrs[name], comps))
        per_layer[key][0] += ms
        per_layer[key][1] += 1
    benchlib.print_table(
        ["conv", "shape", "ms/step", "count"],
        [[k[0], k[1], v[0], v[1]] for k, v in sorted(
            per_layer.items(), key=lambda kv: -kv[1][0])],
        "Convolutions by kind and shape")
    benchlib.print_table(
        ["op", "category", "ms/step"],
        [[o, categorize(instrs[o], comps, batch), ms]
         for o, ms in per_op.most_common(15)], "Top 15 ops")


if __name__ == "__main__":
  app.run(main)
