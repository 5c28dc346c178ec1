"""Replacing nn.Conv's convolutions while a step is traced, for the step benches.

bench/step_variants.py's `drop=` and `conv=torch` variants: a step compiled
inside `dropped_conv_gradients` lacks some of its convolution passes (what
they cost inside the step, which a profile cannot show: XLA:CPU runs its
convolutions asynchronously); inside `torch_convolutions` its convolutions
are PyTorch's oneDNN kernels reached through callbacks. Measurement only.
"""
from __future__ import annotations

import contextlib
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax.linen import linear as flax_linear  # pylint: disable=g-import-not-at-top,wrong-import-position

jax, jnp, np = benchlib.jax, benchlib.jnp, benchlib.np


CONV_GRADIENTS = ("dw", "dx", "dw+dx")


@contextlib.contextmanager
def _flax_conv_replaced(conv: Callable[..., Any]):
  """While active, nn.Conv computes its convolutions with `conv` (the
  signature of lax.conv_general_dilated). nn.Conv looks
  lax.conv_general_dilated up in flax.linen.linear's `lax` at trace time and
  offers no other hook, so that module gets a copy of `lax` with `conv` in
  it; jax itself is untouched."""
  lax = flax_linear.lax
  flax_linear.lax = types.SimpleNamespace(
      **{k: getattr(lax, k) for k in dir(lax) if not k.startswith("__")})
  flax_linear.lax.conv_general_dilated = conv
  try:
    yield
  finally:
    flax_linear.lax = lax


@contextlib.contextmanager
def dropped_conv_gradients(drop: str):
  """While active, every nn.Conv traced computes its convolution through a
  custom VJP whose weight gradient ("dw"), input gradient ("dx") or both
  ("dw+dx") are zeros, so that a step compiled inside it lacks those
  convolutions: its time against the full step's is what they cost inside
  the step. (XLA:CPU's Eigen convolutions run asynchronously on the
  intra-op pool, so a profile's convolution thunks show only their launch.)

  Measurement only: the step trains wrongly.
  """
  if drop not in CONV_GRADIENTS:
    raise ValueError(f"drop={drop!r}; valid choices: "
                     f"{', '.join(CONV_GRADIENTS)}")
  real = jax.lax.conv_general_dilated

  def conv(x, w, *args, **kwargs):
    f = lambda x, w: real(x, w, *args, **kwargs)

    @jax.custom_vjp
    def c(x, w):
      return f(x, w)

    def fwd(x, w):
      return f(x, w), (x, w)

    def bwd(res, g):
      x, w = res
      dx = (jnp.zeros_like(x) if "dx" in drop
            else jax.vjp(lambda x: f(x, w), x)[1](g)[0])
      dw = (jnp.zeros_like(w) if "dw" in drop
            else jax.vjp(lambda w: f(x, w), w)[1](g)[0])
      return dx, dw

    c.defvjp(fwd, bwd)
    return c(x, w)

  with _flax_conv_replaced(conv):
    yield


@contextlib.contextmanager
def torch_convolutions():
  """While active, every nn.Conv traced computes its convolution and both
  its gradients with PyTorch's (oneDNN's) kernels through jax.pure_callback:
  what faster kernels give inside XLA's step when reached from Python.
  NHWC arrays are handed over as channels_last tensors without copies.
  Measurement only (PyTorch is no jaxreg dependency); stride and symmetric
  padding only, which is every conv of the ResNets.
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  real = jax.lax.conv_general_dilated
  # The callbacks' arrays are read-only views of XLA's buffers; PyTorch
  # only reads them here, so its warning about that is silenced.
  warnings.filterwarnings("ignore", "The given NumPy array is not writable")
  nchw = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2)
  oihw = lambda w: torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1
                                                          ).contiguous()
  nhwc = lambda t: np.ascontiguousarray(t.permute(0, 2, 3, 1).numpy())

  def conv(x, w, strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, **kwargs):
    plain = (feature_group_count == 1 and not isinstance(padding, str)
             and all(lo == hi for lo, hi in padding)
             and all(tuple(d or (1, 1)) == (1, 1)
                     for d in (lhs_dilation, rhs_dilation)))
    if not plain:
      raise ValueError("torch_convolutions: only strided convs with "
                       f"symmetric padding, got padding={padding}")
    s, p = list(strides), [lo for lo, _ in padding]
    out = jax.eval_shape(lambda x, w: real(
        x, w, strides, padding, dimension_numbers=dimension_numbers,
        **kwargs), x, w)

    def fwd_cb(x, w):
      with torch.no_grad():
        return nhwc(torch.nn.functional.conv2d(nchw(x), oihw(w), None, s, p))

    def bwd_cb(x, w, g):
      with torch.no_grad():
        dx, dw, _ = torch.ops.aten.convolution_backward(
            nchw(g), nchw(x), oihw(w), None, s, p, [1, 1], False, [0, 0], 1,
            [True, True, False])
      return nhwc(dx), np.ascontiguousarray(dw.permute(2, 3, 1, 0).numpy())

    @jax.custom_vjp
    def c(x, w):
      return jax.pure_callback(fwd_cb, out, x, w)

    def bwd(res, g):
      x, w = res
      shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(w.shape, w.dtype))
      return tuple(jax.pure_callback(bwd_cb, shapes, x, w, g))

    c.defvjp(lambda x, w: (c(x, w), (x, w)), bwd)
    return c(x, w)

  with _flax_conv_replaced(conv):
    yield
