"""Conv implementations for study S3's MNIST CNN on CPU: nn.Conv vs SliceConv.

  python bench/conv_impl.py [--rounds=7] [--steps=10] [--no_torch]

Prints two tables, with the 1-minute load average:
  1. per conv layer of MnistCNN (batch 128): forward and forward+backward ms
     of lax/nn.Conv, of jaxreg.fastconv.slice_conv and of PyTorch's conv2d
     (the first layer's backward is w.r.t. the kernel only, as in training);
  2. the whole S3 training step (forward, backward, SGD momentum; dropout
     0.05 with threefry4x32, BatchNorm) in ms for nn.Conv everywhere, the
     "auto" rule (fastconv.use_slice_conv: SliceConv for 1x1 and Cin = 1),
     SliceConv everywhere, and the PyTorch twin (bench/torch_mnist.py).
JAX variants are compiled with steps.XLA_CPU_OPTIONS and timed interleaved
(every variant runs `steps` steps in turn, each round), median over rounds.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Sequence

import benchlib  # pylint: disable=g-bad-import-order
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg import fastconv  # pylint: disable=g-import-not-at-top
from jaxreg import models  # pylint: disable=g-import-not-at-top
from jaxreg import norms  # pylint: disable=g-import-not-at-top
from jaxreg import steps as steps_lib  # pylint: disable=g-import-not-at-top

BATCH = 128
OPTS = steps_lib.XLA_CPU_OPTIONS


def _time(fn: Callable[[], Any], reps: int) -> float:
  """Median ms of fn() (which blocks) after one warm-up call."""
  return 1e3 * benchlib.time_call(fn, reps, warmup=1)


def _layers() -> list[tuple[str, int, int, int, int, str]]:
  """(name, H, Cin, Cout, k, padding) of MnistCNN's convs on 28x28."""
  out, h, c, t = [], 28, 1, 0
  for tag, f, pad in models.MnistCNN.layout:
    if tag == "pool":
      t += 1
      out.append((f"trans{t}", h, c, f, 1, "VALID"))
      h //= 2
    else:
      out.append((f"conv{tag}", h, c, f, 3, pad))
      h = h - 2 if pad == "VALID" else h
    c = f
  return out


def per_layer(reps: int, with_torch: bool) -> None:
  dn = ("NHWC", "HWIO", "NHWC")
  impls = {
      "nn.Conv": lambda x, w, p: jax.lax.conv_general_dilated(
          x, w, (1, 1), p, dimension_numbers=dn),
      "SliceConv": fastconv.slice_conv,
  }
  rows = []
  rs = np.random.RandomState(0)
  for name, h, cin, cout, k, pad in _layers():
    x = jnp.asarray(rs.randn(BATCH, h, h, cin).astype(np.float32))
    w = jnp.asarray(rs.randn(k, k, cin, cout).astype(np.float32) * 0.1)
    row = [f"{name} {h}x{h} {cin}->{cout} k{k} {pad}"]
    for impl in impls.values():
      conv = lambda x, w, impl=impl: impl(x, w, pad)
      g = jnp.ones(jax.eval_shape(conv, x, w).shape, jnp.float32)
      # The first layer's input needs no gradient in training.
      argnums = (1,) if cin == 1 else (0, 1)

      def fwd_bwd(x, w, g, conv=conv, argnums=argnums):
        y, vjp = jax.vjp(conv, x, w)
        grads = vjp(g)
        return y, tuple(grads[i] for i in argnums)

      f = jax.jit(conv).lower(x, w).compile(compiler_options=OPTS)
      fb = jax.jit(fwd_bwd).lower(x, w, g).compile(compiler_options=OPTS)
      row += [_time(lambda: jax.block_until_ready(f(x, w)), reps),
              _time(lambda: jax.block_until_ready(fb(x, w, g)), reps)]
    if with_torch:
      import torch  # pylint: disable=g-import-not-at-top
      tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(),
                        requires_grad=cin > 1)
      tw = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy(),
                        requires_grad=True)
      tp = 0 if pad == "VALID" else k // 2
      conv = lambda: torch.nn.functional.conv2d(tx, tw, padding=tp)
      tg = torch.ones_like(conv())
      ins = (tx, tw) if cin > 1 else (tw,)
      row += [_time(conv, reps),
              _time(lambda: torch.autograd.grad(conv(), ins, tg), reps)]
    rows.append(row)
  header = ["layer", "nn.Conv fwd", "nn.Conv f+b", "Slice fwd", "Slice f+b"]
  if with_torch:
    header += ["torch fwd", "torch f+b"]
  benchlib.print_table(header, rows, title=(
      f"Per layer, batch {BATCH}, ms (median of {reps}); load "
      f"{benchlib.load_avg():.2f}"))


class _Net(nn.Module):
  """models.MnistCNN (same layout, names and parameters) with the conv of
  each layer chosen by fastconv.use_slice_conv(impl, 'cpu', ...)."""
  num_classes: int
  norm: Any
  impl: str
  dropout: float = 0.05

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(f, ks, pad, name):
      if fastconv.use_slice_conv(self.impl, "cpu", ks, x.shape[-1]):
        return fastconv.SliceConv(f, ks, padding=pad, name=name)
      return nn.Conv(f, ks, padding=pad, use_bias=False, name=name)
    t = 0
    for tag, f, pad in models.MnistCNN.layout:
      if tag == "pool":
        t += 1
        x = conv(f, (1, 1), "VALID", f"trans{t}")(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.relu(conv(f, (3, 3), pad, f"conv{tag}")(x))
      x = models.layers.dropout(self.dropout, x, train, f"drop{tag}")
      x = self.norm(name=f"norm{tag}")(x, train=train)
    return nn.Dense(self.num_classes, name="classifier")(x.mean((1, 2)))


def _jax_step(model, images, labels, tx):
  def step(state, i, key):
    params, batch_stats, opt_state = state
    x = jax.lax.dynamic_slice_in_dim(images, i * BATCH, BATCH)
    x = (x.astype(jnp.float32) / 255.0 - 0.13) / 0.31
    y = jax.lax.dynamic_slice_in_dim(labels, i * BATCH, BATCH)
    k = steps_lib.step_key(jax.random.fold_in(key, i), "threefry4x32")

    def loss_fn(p):
      logits, upd = model.apply(
          {"params": p, "batch_stats": batch_stats}, x, train=True,
          rngs={"dropout": k}, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, u), upd["batch_stats"],
            opt_state), loss
  return jax.jit(step, donate_argnums=0)


def whole_step(rounds: int, steps: int, with_torch: bool) -> None:
  n = BATCH * (steps + 1)
  rs = np.random.RandomState(0)
  images_np = rs.randint(0, 256, (n, 28, 28, 1)).astype(np.uint8)
  labels_np = rs.randint(0, 10, n).astype(np.int32)
  images, labels = jnp.asarray(images_np), jnp.asarray(labels_np)
  tx = optax.sgd(0.04, 0.9)
  norm = norms.make_norm("batch")
  ref_model = models.MnistCNN(10, norm, dropout=0.05)
  ref_params = ref_model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  key = jax.random.key(1)
  runners: dict[str, Callable[[], None]] = {}
  for impl in ("xla", "auto", "slices"):
    model = _Net(10, norm, impl)
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    # Same parameters as jaxreg's MnistCNN: a fair (and checkpoint-safe)
    # comparison.
    jax.tree.map(np.testing.assert_array_equal, v, ref_params)
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))
    fn = _jax_step(model, images, labels, tx).lower(
        state, 0, key).compile(compiler_options=OPTS)
    holder = {"state": state}

    def run(fn=fn, holder=holder):
      for i in range(steps):
        holder["state"], loss = fn(holder["state"], i + 1, key)
      loss.block_until_ready()
    runners[{"xla": "nn.Conv", "auto": "auto (1x1, Cin=1)",
             "slices": "SliceConv all"}[impl]] = run
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_mnist  # pylint: disable=g-import-not-at-top
    config = benchlib.mnist_config()
    torch.manual_seed(0)
    net = torch_mnist.build_net(config)
    opt = torch.optim.SGD(net.parameters(), lr=0.04, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx_t = torch.from_numpy(
        (images_np.astype(np.float32) / 255.0 - 0.13).transpose(0, 3, 1, 2)
        / 0.31)
    ty_t = torch.from_numpy(labels_np.astype(np.int64))
    net.train()

    def run_torch():
      for i in range(steps):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(tx_t[sl]), ty_t[sl])
        loss.backward()
        opt.step()
      float(loss.detach())
    runners["PyTorch"] = run_torch
  times = {name: [] for name in runners}
  for run in runners.values():
    run()
  for _ in range(rounds):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append((time.perf_counter() - t0) / steps * 1e3)
  base = np.asarray(times["nn.Conv"])
  rows = [[name, benchlib.median(t), float(np.min(t)),
           float(np.median(np.asarray(t) / base))]
          for name, t in times.items()]
  benchlib.print_table(
      ["S3 step", "ms median", "ms min", "ratio to nn.Conv"], rows,
      title=(f"Whole S3 step, batch {BATCH}, {rounds} interleaved rounds of "
             f"{steps} steps; load {benchlib.load_avg():.2f}"))


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--reps", type=int, default=20,
                 help="timed calls per layer in the per-layer table")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--skip_layers", action="store_true")
  a = p.parse_args(argv)
  with_torch = not a.no_torch and benchlib.torch_available()
  print(benchlib.environment())
  if not a.skip_layers:
    per_layer(a.reps, with_torch)
  whole_step(a.rounds, a.steps, with_torch)


if __name__ == "__main__":
  main()
