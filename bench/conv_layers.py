"""ResNet-14's convolutions one by one: XLA:CPU against PyTorch's oneDNN.

For every convolution of S4's cifar_resnet (depth 14, batch 128, 28x28x1
Fashion-MNIST images: the 1-channel stem, then 16/32/64 channels at
28x28/14x14/7x7, stride 2 entering stages 2 and 3) times its three passes
alone: the forward convolution, the input gradient and the weight gradient.

  jax            lax.conv_general_dilated in Flax's layout (NHWC, HWIO), each
                 pass its own jitted function (the weight and input
                 gradients from jax.vjp, as the train step gets them),
                 compiled with jaxreg's XLA:CPU options (steps.XLA_CPU_OPTIONS)
  jax NCHW       the same in NCHW / OIHW (XLA picks its own layouts)
  torch NCHW     torch's conv2d and aten.convolution_backward (what
                 autograd calls) on NCHW tensors
  torch NHWC     the same in channels_last memory format

and, on the jax side, other ways to get the weight gradient (the pass where
XLA is furthest from oneDNN), each checked against XLA's own:

  im2col + dot   the 9 shifted views concatenated into [N*H*W, 9*C_in]
                 patches, one matrix product with the output gradient
  per-tap dots   9 matrix products, one per kernel tap, no concatenation
  batch split 8  XLA's weight gradient of 8 slices of the batch, summed
                 (more, smaller convolutions for the thread pool)

Each framework runs in its own process (PyTorch's OpenMP threads spin after
work and would take cores from XLA's pool), 2 threads each, in alternating
rounds; printed per layer and pass: the median milliseconds of each, and
the sums over the network, to set beside the whole step's time
(bench/step_variants.py, with `model.norm=none` for the step without batch
norm).

  python bench/conv_layers.py               # 3 rounds, about 1.5 minutes
  python bench/conv_layers.py --rounds=1 --repeats=5
  python bench/conv_layers.py --rounds=1 \
      --xla=xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION
  python bench/conv_layers.py --child=jax --xla=...  # the jax side's raw
                                            # seconds (JSON), one process
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import childproc  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per pass.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_XLA = flags.DEFINE_multi_string(
    "xla", [], "XLA compiler options added to jaxreg's, key=value "
    "(true/false for bools).")
_CHILD = flags.DEFINE_enum("child", None, ["jax", "jax_nchw", "torch_nchw",
                                           "torch_nhwc"],
                           "Internal: time one framework, print JSON.")

PASSES = ("forward", "input-grad", "weight-grad")
# Other weight gradients, timed on the jax side only (module docstring).
DW_ALTERNATIVES = ("weight-grad im2col + dot", "weight-grad per-tap dots",
                   "weight-grad batch split 8")


def layers() -> list[dict]:
  """cifar_resnet depth 14's convolutions, in order: name, input spatial
  size, channels in and out, stride, and how many identical ones."""
  return [
      dict(name="stem 1->16", hw=28, cin=1, cout=16, stride=1, count=1),
      dict(name="stage1 16->16", hw=28, cin=16, cout=16, stride=1, count=4),
      dict(name="stage2 16->32 /2", hw=28, cin=16, cout=32, stride=2,
           count=1),
      dict(name="stage2 32->32", hw=14, cin=32, cout=32, stride=1, count=3),
      dict(name="stage3 32->64 /2", hw=14, cin=32, cout=64, stride=2,
           count=1),
      dict(name="stage3 64->64", hw=7, cin=64, cout=64, stride=1, count=3),
  ]


def _taps(x, stride: int, ho: int, wo: int) -> list:
  """The 9 views of padded NHWC `x` that meet each tap of a 3x3 kernel."""
  xp = benchlib.jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i:i + stride * (ho - 1) + 1:stride,
             j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(3) for j in range(3)]


def _dw_alternatives(conv, stride: int) -> dict:
  """Weight-gradient functions (x, w, g) -> dW other than XLA's."""
  jax, jnp = benchlib.jax, benchlib.jnp

  def im2col(x, w, g):
    n, ho, wo, cout = g.shape
    cols = jnp.concatenate(_taps(x, stride, ho, wo), axis=-1)
    return (cols.reshape(n * ho * wo, -1).T @ g.reshape(-1, cout)
            ).reshape(w.shape)

  def per_tap(x, w, g):
    n, ho, wo, _ = g.shape
    return jnp.stack([jnp.einsum("nhwc,nhwd->cd", t, g)
                      for t in _taps(x, stride, ho, wo)]).reshape(w.shape)

  def split(x, w, g, k=8):
    b = x.shape[0] // k
    return sum(jax.vjp(lambda w: conv(x[i * b:(i + 1) * b], w), w)[1](
        g[i * b:(i + 1) * b])[0] for i in range(k))
  return dict(zip(DW_ALTERNATIVES, (im2col, per_tap, split)))


def _jax_times(batch: int, repeats: int, nchw: bool) -> dict:
  jax, np = benchlib.jax, benchlib.np
  from jax import lax  # pylint: disable=g-import-not-at-top
  from jaxreg import steps  # pylint: disable=g-import-not-at-top
  opts = dict(steps.XLA_CPU_OPTIONS)
  for kv in _XLA.value:
    k, _, v = kv.partition("=")
    opts[k] = {"true": True, "false": False}.get(v, v)
  dims = ("NCHW", "OIHW", "NCHW") if nchw else ("NHWC", "HWIO", "NHWC")
  rng = np.random.default_rng(0)
  out = {}
  for l in layers():
    s = l["stride"]
    x = rng.standard_normal((batch, l["hw"], l["hw"], l["cin"]), np.float32)
    w = rng.standard_normal((3, 3, l["cin"], l["cout"]), np.float32)
    if nchw:
      x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)

    def conv(x, w, s=s):
      return lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                      dimension_numbers=dims)
    y = conv(x, w)
    g = rng.standard_normal(y.shape, np.float32)
    fns = {
        "forward": lambda x, w, g: conv(x, w),
        "input-grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g),
        "weight-grad": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g
                                                                       )[0],
    }
    if not nchw:
      fns.update(_dw_alternatives(conv, s))
    args = [jax.device_put(a) for a in (x, w, g)]
    row, results = {}, {}
    for p, f in fns.items():
      c = jax.jit(f).lower(*args).compile(compiler_options=opts)
      results[p] = np.asarray(c(*args))
      row[p] = benchlib.time_call(lambda c=c: jax.block_until_ready(c(*args)), repeats)
    for p in DW_ALTERNATIVES:
      if p in results:
        ref = results["weight-grad"]
        err = np.abs(results[p] - ref).max() / np.abs(ref).max()
        # float32 sums of N*H*W = 25k-100k products in another order.
        if err > 1e-4:
          raise AssertionError(f"{l['name']}: {p} differs from XLA's "
                               f"weight gradient by {err:.1e} (relative)")
    out[l["name"]] = row
  return out


def _torch_times(batch: int, repeats: int, channels_last: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  gen = torch.Generator().manual_seed(0)
  out = {}
  for l in layers():
    s = l["stride"]
    x = torch.randn(batch, l["cin"], l["hw"], l["hw"], generator=gen
                    ).contiguous(memory_format=fmt)
    w = torch.randn(l["cout"], l["cin"], 3, 3, generator=gen
                    ).contiguous(memory_format=fmt)
    with torch.no_grad():
      y = torch.nn.functional.conv2d(x, w, None, s, 1)
    g = torch.randn(y.shape, generator=gen).contiguous(memory_format=fmt)

    def back(mask, x=x, w=w, g=g, s=s):
      return torch.ops.aten.convolution_backward(
          g, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask)
    fns = {
        "forward": lambda x=x, w=w, s=s: torch.nn.functional.conv2d(
            x, w, None, s, 1),
        "input-grad": lambda: back([True, False, False]),
        "weight-grad": lambda: back([False, True, False]),
    }
    with torch.no_grad():
      out[l["name"]] = {p: benchlib.time_call(f, repeats) for p, f in fns.items()}
  return out


def _child(kind: str) -> None:
  if kind.startswith("jax"):
    r = _jax_times(_BATCH.value, _REPEATS.value, kind == "jax_nchw")
  else:
    r = _torch_times(_BATCH.value, _REPEATS.value, kind == "torch_nhwc")
  childproc.print_result(r)


def _run_child(kind: str) -> dict:
  return childproc.run_script(
      [__file__, f"--child={kind}", f"--batch={_BATCH.value}",
       f"--repeats={_REPEATS.value}"] + [f"--xla={kv}" for kv in _XLA.value],
      f"{kind} child", env=dict(os.environ, OMP_NUM_THREADS="2"))


def main(argv):
  del argv
  if _CHILD.value:
    _child(_CHILD.value)
    return
  torch = ["torch_nchw", "torch_nhwc"] if benchlib.torch_available() else []
  if not torch:
    print(benchlib.TORCH_INSTALL_HINT)
  kinds = ["jax", "jax_nchw"] + torch
  print(benchlib.environment())
  load0 = benchlib.load_avg()
  rounds = {k: [] for k in kinds}
  for r in range(_ROUNDS.value):
    for k in kinds:
      rounds[k].append(_run_child(k))
      print(f"round {r + 1}/{_ROUNDS.value}: {k} done", flush=True)
  load1 = benchlib.load_avg()
  passes = PASSES + DW_ALTERNATIVES
  # Median ms per kind, layer and pass (absent: that kind does not time it).
  med = {k: {l["name"]: {p: 1e3 * benchlib.median([rd[l["name"]][p]
                                                   for rd in v])
                         for p in passes if p in v[0][l["name"]]}
             for l in layers()} for k, v in rounds.items()}
  header = ["layer", "count", "pass"] + [f"{k} ms" for k in kinds]
  if torch:
    header.append("jax / torch best")
  totals = {k: dict.fromkeys(passes, 0.0) for k in kinds}
  rows = []

  def row(name, count, p, ms):
    r = [name, count, p] + ["" if m is None else m for m in ms]
    if torch:
      best = min(m for m in ms[2:] if m is not None) if ms[2] else None
      r.append(ms[0] / best if best else "")
    rows.append(r)

  for l in layers():
    for p in passes:
      if l["cin"] == 1 and p == "input-grad":
        continue  # The network's input needs no gradient.
      ms = [med[k][l["name"]].get(p) for k in kinds]
      for k, m in zip(kinds, ms):
        if m is not None:
          totals[k][p] += l["count"] * m
      row(l["name"], l["count"], p, ms)
  for p in PASSES + ("all",) + DW_ALTERNATIVES:
    ms = [sum(totals[k][q] for q in PASSES) if p == "all"
          else totals[k][p] or None for k in kinds]
    row("network (x count)", "", p, ms)
  benchlib.print_table(
      header, rows, f"ResNet-14 convolutions, batch {_BATCH.value}: median "
      f"ms per call ({_ROUNDS.value} rounds x {_REPEATS.value} calls, load "
      f"{load0:.2f} -> {load1:.2f}); 'jax / torch best' compares the jax "
      f"column with the faster PyTorch layout")


if __name__ == "__main__":
  app.run(main)
