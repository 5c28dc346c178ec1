"""Batch norm + residual add + ReLU as one custom VJP, against jaxreg's.

jaxreg's ResNet blocks apply `norms.batch_norm_affine` (batch norm with a
closed-form backward pass) and then ReLU, or a residual add and ReLU,
each differentiated on its own. This times the alternative of one custom
VJP for the whole `relu(bn(x) + shortcut)`: the backward pass applies the
ReLU mask inside batch norm's closed form (sum(g), sum(g * xhat), dx in one
elementwise pass) and hands the masked gradient to the shortcut, so no
separate mask pass is written out.

Timed: forward and backward of S4's first stage (4 basic blocks, conv3x3 ->
BN -> ReLU -> conv3x3 -> BN, + identity, ReLU; 16 channels at 28x28, batch
128) with jaxreg's XLA:CPU options, both versions in one process in
alternating rounds; their gradients are checked equal first.

  python bench/bn_fusion.py
"""
from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

jax, jnp, np = benchlib.jax, benchlib.jnp, benchlib.np

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Alternating rounds.")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls per version per round.")

EPS = 1e-5


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))


def bn(x, scale, bias):
  """jaxreg's training batch norm (one virtual batch: all of it)."""
  return benchlib.norms.batch_norm_affine(x[None], scale, bias, EPS)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def bn_add_relu(x, scale, bias, shortcut, has_shortcut: bool):
  """relu(bn(x) + shortcut) (shortcut ignored unless has_shortcut)."""
  return _fwd(x, scale, bias, shortcut, has_shortcut)[0]


def _fwd(x, scale, bias, shortcut, has_shortcut):
  axes = (0, 1, 2)
  mean = x.mean(axes)
  r = jax.lax.rsqrt(jnp.square(x - mean).mean(axes) + EPS)
  y = (x - mean) * (r * scale) + bias
  if has_shortcut:
    y = y + shortcut
  y = jnp.maximum(y, 0)
  return y, (x, mean, r, scale, y)


def _bwd(has_shortcut, res, g):
  x, mean, r, scale, y = res
  g = jnp.where(y > 0, g, 0)
  count = math.prod(x.shape[:-1])
  xhat = (x - mean) * r
  sum_g, sum_gx = g.sum((0, 1, 2)), (g * xhat).sum((0, 1, 2))
  dx = (scale * r) * (g - (sum_g + xhat * sum_gx) / count)
  return dx, sum_gx, sum_g, g if has_shortcut else jnp.zeros_like(g)


bn_add_relu.defvjp(_fwd, _bwd)


def block_jaxreg(p, x):
  y = jax.nn.relu(bn(conv(x, p["w1"]), p["s1"], p["b1"]))
  return jax.nn.relu(bn(conv(y, p["w2"]), p["s2"], p["b2"]) + x)


def block_fused(p, x):
  y = bn_add_relu(conv(x, p["w1"]), p["s1"], p["b1"], x, False)
  return bn_add_relu(conv(y, p["w2"]), p["s2"], p["b2"], x, True)


def main(argv):
  del argv
  print(benchlib.environment())
  rng = np.random.default_rng(0)
  c = 16
  x = jnp.asarray(rng.standard_normal((128, 28, 28, c), np.float32))
  p = {k: jnp.asarray(0.1 * rng.standard_normal((3, 3, c, c), np.float32))
       for k in ("w1", "w2")}
  p.update(s1=jnp.ones(c), b1=jnp.full(c, 0.1), s2=jnp.ones(c),
           b2=jnp.zeros(c))
  opts = dict(benchlib.steps_lib.XLA_CPU_OPTIONS)
  fns = {}
  for name, block in [("jaxreg (BN, then ReLU / add + ReLU)", block_jaxreg),
                      ("one custom VJP (BN + add + ReLU)", block_fused)]:
    def loss(p, x, block=block):
      for _ in range(4):
        x = block(p, x)
      return jnp.sum(x * x)
    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        p, x).compile(compiler_options=opts)
  grads = [jax.tree.leaves(f(p, x)) for f in fns.values()]
  err = max(float(jnp.abs(a - b).max() / jnp.abs(a).max())
            for a, b in zip(*grads))
  # Same formulas in float32, summed in possibly different orders.
  assert err < 1e-4, f"the two versions' gradients differ by {err:.1e}"
  load0 = benchlib.load_avg()
  times = {k: [] for k in fns}
  for _ in range(_ROUNDS.value):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(_CALLS.value):
        jax.block_until_ready(f(p, x))
      times[k].append((time.perf_counter() - t0) / _CALLS.value)
  load1 = benchlib.load_avg()
  first = next(iter(times))
  benchlib.print_table(
      ["version", "ms per forward+backward", "vs first", "ms per round"],
      [[k, 1e3 * benchlib.median(t),
        benchlib.median([a / b for a, b in zip(t, times[first])]),
        " ".join(f"{1e3 * a:.0f}" for a in t)] for k, t in times.items()],
      f"S4 stage 1 (4 blocks, batch 128, 28x28x16), gradients differ by "
      f"{err:.0e} (relative, max); {_ROUNDS.value} rounds x {_CALLS.value} calls, load "
      f"{load0:.2f} -> {load1:.2f}")


if __name__ == "__main__":
  app.run(main)
