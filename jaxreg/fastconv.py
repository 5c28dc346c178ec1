"""Convolutions written as matrix products, for small nets on XLA:CPU.

`SliceConv` is a drop-in for a stride-1 `nn.Conv` (same parameter names,
shapes, initializers and so the same checkpoints and parameter counts) that
computes
  * a 1x1 conv as one dot: (N*H*W, Cin) @ (Cin, Cout);
  * a kxk conv as "im2col by shifted slices": the k*k shifted views of the
    (padded) input are concatenated along the channel axis, (N, H', W',
    k*k*Cin), and multiplied by the kernel reshaped to (k*k*Cin, Cout).
Its backward pass is dots plus slices, pads and adds, which XLA:CPU runs
through its dot library instead of its generic convolution emitters.

Measured on the 2-core CPU (bench/conv_impl.py; jax 0.10.2, trainer's
XLA_CPU_OPTIONS), forward + backward per layer of the S3 MNIST CNN:
slices win for the 1x1 transition convs and for the first conv (Cin = 1),
and lose for 3x3 convs with Cin >= 8 at 24x24 and up, where XLA:CPU's
channel-axis concatenate costs more than its convolution. `use_slice_conv`
encodes that rule for `conv_impl="auto"`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear as flax_linear

Array = jax.Array
PaddingLike = str | int | Sequence[int | tuple[int, int]]

CONV_IMPLS = ("auto", "slices", "xla")


def _kernel_size(kernel_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(kernel_size, int):
    return (kernel_size, kernel_size)
  ks = tuple(int(k) for k in kernel_size)
  if len(ks) != 2 or min(ks) < 1:
    raise ValueError(
        f"kernel_size={kernel_size!r}: SliceConv is a 2-D conv; give two "
        "positive sizes, e.g. (3, 3)")
  return ks


def _pads(padding: PaddingLike, ks: tuple[int, int]
          ) -> tuple[tuple[int, int], tuple[int, int]]:
  """(lo, hi) padding of H and W, as nn.Conv resolves `padding` for
  stride 1 (lax.padtype_to_pads)."""
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return ((0, 0), (0, 0))
    if padding.upper() == "SAME":
      return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks)
    raise ValueError(
        f"padding={padding!r}: SliceConv supports 'VALID', 'SAME', an int "
        "or ((lo, hi), (lo, hi)); use nn.Conv for 'CIRCULAR' or 'CAUSAL'")
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(padding)
  if len(pads) != 2:
    raise ValueError(f"padding={padding!r}: give one entry per spatial dim")
  out = []
  for p in pads:
    if isinstance(p, int):
      out.append((p, p))
    else:
      lo, hi = p
      out.append((int(lo), int(hi)))
  return tuple(out)


def slice_conv(x: Array, kernel: Array, padding: PaddingLike = "VALID"
               ) -> Array:
  """Stride-1 NHWC conv with an HWIO kernel, as slices and one dot.

  Equals lax.conv_general_dilated(x, kernel, (1, 1), padding,
  dimension_numbers=("NHWC", "HWIO", "NHWC")) up to float summation order.
  """
  kh, kw, cin, cout = kernel.shape
  if x.ndim != 4 or x.shape[-1] != cin:
    raise ValueError(
        f"slice_conv: input shape {x.shape} does not match kernel "
        f"{kernel.shape}; give NHWC input with {cin} channels")
  (ph_lo, ph_hi), (pw_lo, pw_hi) = _pads(padding, (kh, kw))
  if ph_lo or ph_hi or pw_lo or pw_hi:
    x = jnp.pad(x, ((0, 0), (ph_lo, ph_hi), (pw_lo, pw_hi), (0, 0)))
  n, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  if ho < 1 or wo < 1:
    raise ValueError(
        f"slice_conv: input {x.shape[1:3]} (padded) is smaller than the "
        f"kernel {(kh, kw)}")
  if kh == kw == 1:
    cols = x
  else:
    # Channel order (i, j, c) is the row order of the HWIO kernel reshaped.
    cols = jnp.concatenate(
        [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
        axis=-1)
  y = jnp.dot(cols.reshape(n * ho * wo, kh * kw * cin),
              kernel.reshape(kh * kw * cin, cout))
  return y.reshape(n, ho, wo, cout)


class SliceConv(nn.Module):
  """Stride-1 2-D conv computed by `slice_conv`; parameters as nn.Conv's.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw) or one int for both.
    padding: 'VALID', 'SAME', an int, or ((lo, hi), (lo, hi)).
    use_bias: add a `bias` of shape (features,).
    dtype: computation dtype (None: promoted from input and params).
    param_dtype: dtype of the parameters.
    kernel_init: initializer of `kernel`, HWIO (nn.Conv's default).
    bias_init: initializer of `bias` (nn.Conv's default).
  """
  features: int
  kernel_size: int | Sequence[int]
  padding: PaddingLike = "SAME"
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = flax_linear.default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ks = _kernel_size(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init,
                        ks + (x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias,
                                                dtype=self.dtype)
    y = slice_conv(x, kernel, self.padding)
    if bias is not None:
      y = y + bias
    return y


def check_conv_impl(impl: str) -> str:
  """Returns `impl` if it is one of CONV_IMPLS; else ValueError."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl={impl!r}; valid choices: "
                     f"{', '.join(CONV_IMPLS)}")
  return impl


def use_slice_conv(impl: str, platform: str, kernel_size: int | Sequence[int],
                   in_features: int) -> bool:
  """Whether a stride-1 conv should be a SliceConv rather than nn.Conv.

  Args:
    impl: "slices" (always), "xla" (never) or "auto": on CPU, for 1x1
      kernels and single-channel inputs, the layers where slices measured
      faster (module docstring); elsewhere nn.Conv.
    platform: jax.default_backend() of the run ("cpu", "gpu", "tpu").
    kernel_size: the conv's kernel size.
    in_features: the conv's input channels.
  """
  check_conv_impl(impl)
  if impl != "auto":
    return impl == "slices"
  if platform != "cpu":
    return False
  kh, kw = _kernel_size(kernel_size)
  return (kh == kw == 1) or in_features == 1
