"""Building blocks shared by the models: convs, dropout slots, initializers.

Dropout slots: `dropout(rate, x, train, name, keep)` is an nn.Dropout(rate)
named `name`, skipped (no module) when the rate is 0, or, when the model's
DROPOUT_COLLECTION holds a keep probability for it (`traced_keep`), a
TracedDropout drawing its mask with that (possibly traced) probability.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreg import fastconv

ModuleDef = Any
Array = jax.Array

# The variables collection of traced keep probabilities (models docstring).
DROPOUT_COLLECTION = "dropout_keep"

# Names of the bottleneck dropout slots (modules in every block) and of
# their rates in the DROPOUT_COLLECTION of resnet50 and nf_resnet.
SLOT_DROPOUTS = ("drop1", "drop2", "drop3")

# PyTorch's default Conv2d / Linear init, kaiming_uniform(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                      "uniform")


def conv(features: int, kernel: int, strides: int = 1, *, use_bias: bool,
         name: str, impl: str = "xla", in_features: int | None = None
         ) -> nn.Module:
  """A square nn.Conv with Flax's default (LeCun normal) init, or the
  fastconv.SliceConv with the same parameters where `impl` (one of
  fastconv.CONV_IMPLS) picks it for a stride-1 conv of `in_features` input
  channels (fastconv.use_slice_conv)."""
  # Symmetric padding (PyTorch style) so stride-2 3x3 convs see the same
  # pixels as the reference implementations; 1x1 convs need none.
  if strides == 1 and in_features is not None and fastconv.use_slice_conv(
      impl, jax.default_backend(), kernel, in_features):
    return fastconv.SliceConv(features, kernel, padding=kernel // 2,
                              use_bias=use_bias, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=kernel // 2, use_bias=use_bias, name=name)


class TracedDropout(nn.Module):
  """nn.Dropout with its keep probability (1 - rate) given as an array.

  Computes what flax 0.12's nn.Dropout(rate) computes under jit, bit for
  bit: one make_rng("dropout") of this module (so the same rng as an
  nn.Dropout of the same name), mask = bernoulli(rng, keep, shape), then
  select(mask, x * (1 / keep), 0). nn.Dropout writes x / keep, but its keep
  is a compile-time constant and XLA rewrites division by a constant as
  multiplication by its (float32) reciprocal; a traced keep is no constant,
  so the reciprocal is written out. `keep` is float32, rounded once from
  float64 1 - rate (`models.dropout_keep`), as nn.Dropout's Python float is.
  keep = 1 returns x exactly (uniform draws are < 1, and x * 1 = x).
  """

  @nn.compact
  def __call__(self, x: Array, keep: Array, deterministic: bool) -> Array:
    if deterministic:
      return x
    keep = jnp.asarray(keep, jnp.float32)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
    # nn.Dropout's Python float takes x's dtype (weak typing).
    scale = 1.0 / keep.astype(x.dtype)
    return jax.lax.select(mask, x * scale, jnp.zeros_like(x))


def traced_keep(module: nn.Module, names: Sequence[str]
                ) -> dict[str, Array | None]:
  """Each name's keep probability in the module's DROPOUT_COLLECTION (None
  where absent); refuses names the module does not know."""
  given = module.variables.get(DROPOUT_COLLECTION, {})
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ValueError(
        f"{DROPOUT_COLLECTION} collection has {', '.join(unknown)}, which "
        f"{type(module).__name__} does not have; valid choices: "
        f"{', '.join(names) or '(none: it has no dropout)'}")
  return {n: given.get(n) for n in names}


def dropout(rate: float, x: Array, train: bool, name: str,
            keep: Array | None = None) -> Array:
  """The dropout slot `name`: traced when `keep` is given, else
  nn.Dropout(rate), or nothing at rate 0."""
  # The slot keeps its name (and so its rng) whichever way it is built.
  if keep is not None:
    return TracedDropout(name=name)(x, keep, deterministic=not train)
  # Rate-0 slots create no module, so their paths do not clutter masks.
  if rate <= 0.0:
    return x
  return nn.Dropout(rate, name=name)(x, deterministic=not train)


def residual_blocks(stage_sizes: Sequence[int]
                    ) -> Iterator[tuple[int, int, int, str]]:
  """(stage, block, strides, name) of every block of a ResNet, 0-based
  stage and block: stride 2 entering every stage after the first, names
  "stage<s>_block<b>" (1-based)."""
  for stage, size in enumerate(stage_sizes):
    for block in range(size):
      strides = 2 if stage > 0 and block == 0 else 1
      yield stage, block, strides, f"stage{stage + 1}_block{block + 1}"


def bottleneck_slots(features: int, strides: int
                     ) -> tuple[tuple[int, int, int, int], ...]:
  """(k, features, kernel, strides) of the three conv slots of a
  bottleneck: 1x1, 3x3 (strided), 1x1 with 4x the features."""
  return ((1, features, 1, 1), (2, features, 3, strides),
          (3, 4 * features, 1, 1))


class WSConv(nn.Module):
  """Scaled weight-standardized conv (Brock et al. 2021a, eq. 2).

  W_hat = gain * (W - mean(W)) / sqrt(max(fan_in * var(W), eps)), mean and
  var over every axis but the output one, so each output unit's weights
  have zero mean and squared norm gain**2; the conv then preserves the
  variance of unit-variance inputs. Params: `kernel` (HWIO), `gain` (ones),
  `bias` (zeros).
  """
  features: int
  kernel_size: int
  strides: int = 1
  eps: float = 1e-4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
    gain = self.param("gain", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    fan_in = k * k * x.shape[-1]
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * gain
    weight = (kernel - mean) * scale
    y = jax.lax.conv_general_dilated(
        x, weight.astype(x.dtype), (self.strides, self.strides),
        [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def dirac_init(base: Callable = torch_default_init) -> Callable:
  """`base`, then the first C_in output channels of an HWIO kernel set to
  the identity (centre tap 1 on the matching input channel, 0 elsewhere),
  as airbench's `dirac_(w[:C_in])`: an implicit residual at init."""

  def init(key, shape, dtype=jnp.float32):
    kernel = base(key, shape, dtype)
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    idx = jnp.arange(n)
    kernel = kernel.at[..., :n].set(0)
    return kernel.at[kh // 2, kw // 2, idx, idx].set(1)

  return init
