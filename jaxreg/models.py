"""Image classifiers for the studies, selected by name from `config.model.name`.

Every model is a linen dataclass that receives its normalization as a factory
(`norm: ModuleDef`, resolved once by `build_model` from `config.model.norm`)
and names every submodule explicitly, so parameter paths are stable and
regex masks can select them (the final Dense layer is always `classifier`;
conv and dense weights are always `kernel`).

Call contract (shared with the train loop):
  model.apply(variables, x, train=bool, rngs={"dropout": key},
              mutable=["batch_stats"] if train else False)
with `x` float32 NHWC standardized images; returns float32 logits
[B, num_classes] (the loss applies log-softmax).

Traced dropout rates: `variables` may also hold a DROPOUT_COLLECTION
("dropout_keep") collection, `dropout_keep(config.model)`: the keep
probability 1 - p of each dropout rate the config sets, as float32 scalars
that may be traced (stacked.py gives each member of a group its own). Every
slot whose rate is in it is then built (even where its static rate is 0)
and draws its mask with that keep probability; with the same dropout rng a
slot of keep 1 - p computes bit for bit what nn.Dropout(p) does, and one of
keep 1 returns its input exactly. Without it, rates are the static fields
and rate-0 slots are skipped in Python, as before.

Models:
  mnist_cnn     S3: small all-convolutional "EVA" network (~11k params).
  cifar_resnet  S4: ResNet 6n+2 of He et al. 2016, option A shortcuts.
  resnet50      S1/S2: bottleneck ResNet-50 with a CIFAR stem and
                per-slot control of norm and dropout layers.
  resnet9       S5: DavidNet / Myrtle ResNet-9 (~6.57M params).
  nf_resnet     S2: normalization-free bottleneck ResNet-50 (NF-ResNet).
  airbench      Keller Jordan's airbench94 net (~2M params): a frozen
                patch-whitening conv set from the training data
                (`data_init`), then three conv-pool-norm-GELU blocks.

A model that needs the training data to initialise (airbench) has a method
`data_init(params, images_u8, mean, std) -> params`; the trainer calls it
after `init` when present.

Convolutions use Flax's default initializer (LeCun normal); a conv directly
followed by a norm slot has no bias, one without a norm slot has a bias
(airbench keeps its reference's PyTorch initialisation, see there).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxreg import fastconv
from jaxreg import norms
from jaxreg.registry import Registry

ModuleDef = Any
Array = jax.Array

# Fixed-variance ReLU: gamma * relu(z) has unit variance for z ~ N(0, 1)
# (Brock et al. 2021a): Var[relu(z)] = (1 - 1/pi) / 2. The closed form; the
# DeepMind and timm code bake an empirical 1.7139588594 (0.06% larger).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def _conv(features: int, kernel: int, strides: int = 1, *, use_bias: bool,
          name: str) -> nn.Conv:
  # Symmetric padding (PyTorch style) so stride-2 3x3 convs see the same
  # pixels as the reference implementations; 1x1 convs need none.
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=kernel // 2, use_bias=use_bias, name=name)


DROPOUT_COLLECTION = "dropout_keep"


class TracedDropout(nn.Module):
  """nn.Dropout with its keep probability (1 - rate) given as an array.

  Computes what flax 0.12's nn.Dropout(rate) computes under jit, bit for
  bit: one make_rng("dropout") of this module (so the same rng as an
  nn.Dropout of the same name), mask = bernoulli(rng, keep, shape), then
  select(mask, x * (1 / keep), 0). nn.Dropout writes x / keep, but its keep
  is a compile-time constant and XLA rewrites division by a constant as
  multiplication by its (float32) reciprocal; a traced keep is no constant,
  so the reciprocal is written out. `keep` is float32, rounded once from
  float64 1 - rate (`dropout_keep`), as nn.Dropout's Python float is.
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


def _traced_keep(module: nn.Module, names: Sequence[str]
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


def _dropout(rate: float, x: Array, train: bool, name: str,
             keep: Array | None = None) -> Array:
  # The slot keeps its name (and so its rng) whichever way it is built.
  if keep is not None:
    return TracedDropout(name=name)(x, keep, deterministic=not train)
  # Rate-0 slots create no module, so their paths do not clutter masks.
  if rate <= 0.0:
    return x
  return nn.Dropout(rate, name=name)(x, deterministic=not train)


# --------------------------------------------------------------------------
# S3: small MNIST CNN.


class MnistCNN(nn.Module):
  """All-convolutional "EVA" style network for 28x28 digits (~11k params).

  Blocks are conv(3x3, no bias) -> ReLU -> dropout -> norm. Two 1x1
  transition convs (linear, channels 16 -> 8) each precede a 2x2 max-pool.
  The first two stages use valid padding (28 -> 26 -> 24 -> pool 12 -> 10 ->
  8 -> 6 -> pool 3), the last stage same padding so 32x32 inputs also work
  (32 -> ... -> 4). Global average pool, then a Dense `classifier`.
  """
  num_classes: int
  norm: ModuleDef
  dropout: float = 0.0
  # How stride-1 convs are computed (fastconv.CONV_IMPLS): "auto" takes
  # fastconv.SliceConv where it measured faster (1x1 and 1-channel-input
  # convs on CPU), "xla" always nn.Conv. Same parameters either way.
  conv_impl: str = "xla"

  # (name, out channels, padding) of the 3x3 conv blocks; "pool" marks a
  # 1x1 transition conv followed by a max-pool.
  layout: Sequence[tuple[str, int, str]] = (
      ("1", 8, "VALID"), ("2", 16, "VALID"), ("pool", 8, ""),
      ("3", 16, "VALID"), ("4", 16, "VALID"), ("5", 16, "VALID"),
      ("pool", 8, ""), ("6", 16, "SAME"), ("7", 16, "SAME"))

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    keep = _traced_keep(self, ("dropout",))["dropout"]
    platform = jax.default_backend()

    def conv(features, kernel, padding, name):
      slices = fastconv.use_slice_conv(self.conv_impl, platform, kernel,
                                       x.shape[-1])
      cls = fastconv.SliceConv if slices else nn.Conv
      return cls(features, kernel, padding=padding, use_bias=False, name=name)

    transitions = 0
    for tag, features, padding in self.layout:
      if tag == "pool":
        transitions += 1
        x = conv(features, (1, 1), "VALID", f"trans{transitions}")(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = conv(features, (3, 3), padding, f"conv{tag}")(x)
      x = nn.relu(x)
      x = _dropout(self.dropout, x, train, f"drop{tag}", keep)
      x = self.norm(name=f"norm{tag}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# S4: CIFAR ResNet 6n+2.


class BasicBlock(nn.Module):
  """conv3x3 -> norm -> ReLU -> [dropout] -> conv3x3 -> norm, + shortcut.

  Option A shortcut (He et al. 2016, CIFAR): identity, or when the shape
  changes, stride-2 subsampling plus zero channels appended, so the
  shortcut has no parameters.
  """
  features: int
  strides: int
  norm: ModuleDef
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               dropout_keep: Array | None = None) -> Array:
    y = _conv(self.features, 3, self.strides, use_bias=False, name="conv1")(x)
    y = self.norm(name="norm1")(y, train=train)
    y = nn.relu(y)
    y = _dropout(self.dropout, y, train, "drop1", dropout_keep)
    y = _conv(self.features, 3, use_bias=False, name="conv2")(y)
    y = self.norm(name="norm2")(y, train=train)
    shortcut = x
    if self.strides != 1:
      shortcut = shortcut[:, ::self.strides, ::self.strides, :]
    extra = self.features - shortcut.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet 6n+2 for CIFAR: 3x3 stem (16), three stages of n basic blocks
  with widths 16/32/64 (stride 2 entering stages 2 and 3), global average
  pool, Dense `classifier`. `dropout` (default 0) sits between the two convs
  of every block, as in wide ResNets."""
  num_classes: int
  norm: ModuleDef
  depth: int = 14
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    n = (self.depth - 2) // 6
    keep = _traced_keep(self, ("dropout",))["dropout"]
    x = _conv(16, 3, use_bias=False, name="stem_conv")(x)
    x = self.norm(name="stem_norm")(x, train=train)
    x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.norm, self.dropout,
                       name=f"stage{stage + 1}_block{block + 1}")(
                           x, train, keep)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# S1/S2: bottleneck ResNet-50 with per-slot norm and dropout.

# Names of the bottleneck dropout slots (modules in every block) and of
# their rates in the DROPOUT_COLLECTION of resnet50 and nf_resnet.
SLOT_DROPOUTS = ("drop1", "drop2", "drop3")


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (4x features) bottleneck, + shortcut.

  Slot k (1-based) is conv{k} -> [norm{k} if k <= norm_layers] -> ReLU
  (slots 1, 2 only) -> [drop{k} if dropout_rates[k-1] > 0, or with keep
  probability dropout_keep[k-1] when that is given]. Slot 3's
  dropout comes before the residual addition; the ReLU after the addition.
  The projection shortcut (proj_conv, when the shape changes) is followed
  by proj_norm only if norm_layers > 0.
  """
  features: int
  strides: int
  norm: ModuleDef
  norm_layers: int = 3
  dropout_rates: tuple[float, float, float] = (0.0, 0.0, 0.0)

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               dropout_keep: Sequence[Array | None] = (None,) * 3) -> Array:
    slots = ((self.features, 1, 1), (self.features, 3, self.strides),
             (4 * self.features, 1, 1))
    y = x
    for k, (features, kernel, strides) in enumerate(slots, start=1):
      has_norm = k <= self.norm_layers
      y = _conv(features, kernel, strides, use_bias=not has_norm,
                name=f"conv{k}")(y)
      if has_norm:
        y = self.norm(name=f"norm{k}")(y, train=train)
      if k < 3:
        y = nn.relu(y)
      y = _dropout(self.dropout_rates[k - 1], y, train, f"drop{k}",
                   dropout_keep[k - 1])
    shortcut = x
    if x.shape != y.shape:
      has_norm = self.norm_layers > 0
      shortcut = _conv(4 * self.features, 1, self.strides,
                       use_bias=not has_norm, name="proj_conv")(x)
      if has_norm:
        shortcut = self.norm(name="proj_norm")(shortcut, train=train)
    return nn.relu(y + shortcut)


class ResNet50(nn.Module):
  """Bottleneck ResNet for 32x32 inputs: 3x3 stem conv (no max-pool), stages
  of bottlenecks with widths width * (1, 2, 4, 8) (outputs 4x that), stride
  2 entering every stage after the first, global average pool, Dense
  `classifier`. The stem is followed by `stem_norm` only if norm_layers > 0,
  so norm_layers=0 is entirely normalization-free."""
  num_classes: int
  norm: ModuleDef
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  norm_layers: int = 3
  dropout_rates: tuple[float, float, float] = (0.0, 0.0, 0.0)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    keep = tuple(_traced_keep(self, SLOT_DROPOUTS).values())
    has_norm = self.norm_layers > 0
    x = _conv(self.width, 3, use_bias=not has_norm, name="stem_conv")(x)
    if has_norm:
      x = self.norm(name="stem_norm")(x, train=train)
    x = nn.relu(x)
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.width * 2**stage, strides, self.norm,
                       self.norm_layers, self.dropout_rates,
                       name=f"stage{stage + 1}_block{block + 1}")(
                           x, train, keep)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# S5: ResNet-9 (DavidNet).


class ConvUnit(nn.Module):
  """conv3x3 (no bias) -> norm -> ReLU -> [2x2 max-pool]."""
  features: int
  norm: ModuleDef
  pool: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _conv(self.features, 3, use_bias=False, name="conv")(x)
    x = self.norm(name="norm")(x, train=train)
    x = nn.relu(x)
    if self.pool:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class ResNet9(nn.Module):
  """DavidNet: prep(64) -> layer1(128, pool) + res(128, 128) -> layer2(256,
  pool) -> layer3(512, pool) + res(512, 512) -> global max-pool -> Dense
  `classifier` (no bias) -> logits * logit_scale. Widths are width * (1, 2,
  4, 8). `dropout` follows each conv unit inside the two residual branches
  (modules layer{1,3}_res{1,2}_drop)."""
  num_classes: int
  norm: ModuleDef
  width: int = 64
  logit_scale: float = 0.125
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    w = self.width
    keep = _traced_keep(self, ("dropout",))["dropout"]
    x = ConvUnit(w, self.norm, name="prep")(x, train)
    for layer, features, residual in ((1, 2 * w, True), (2, 4 * w, False),
                                      (3, 8 * w, True)):
      x = ConvUnit(features, self.norm, pool=True, name=f"layer{layer}")(
          x, train)
      if residual:
        y = x
        for r in (1, 2):
          y = ConvUnit(features, self.norm, name=f"layer{layer}_res{r}")(
              y, train)
          y = _dropout(self.dropout, y, train, f"layer{layer}_res{r}_drop",
                       keep)
        x = x + y
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, name="classifier")(x)
    return x * self.logit_scale


# --------------------------------------------------------------------------
# S2: normalization-free ResNet-50 (Brock et al. 2021a, "NF-ResNets").


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


def nf_block_betas(stage_sizes: Sequence[int],
                   alpha: float) -> list[list[float]]:
  """beta = expected std of each NF block's input, per stage and block.

  The input variance starts at 1 after the stem, grows by alpha**2 per block
  (the branch output has unit variance and is scaled by alpha), and resets
  to 1 + alpha**2 after a stage's first block, whose shortcut is a
  projection of the (unit-variance) normalized input.
  """
  var = 1.0
  betas = []
  for size in stage_sizes:
    stage = []
    for block in range(size):
      stage.append(math.sqrt(var))
      if block == 0:
        var = 1.0
      var += alpha**2
    betas.append(stage)
  return betas


def _scaled_relu(x: Array) -> Array:
  return nn.relu(x) * RELU_GAMMA


class NFBottleneck(nn.Module):
  """Pre-activation NF bottleneck: h = x + alpha * skip_gain * f(act(x) / beta).

  f is WSConv 1x1 -> act -> WSConv 3x3 (strided) -> act -> WSConv 1x1 (4x),
  with act = gamma * ReLU; `skip_gain` is a scalar initialised to 0
  (SkipInit), so every block starts as its shortcut. Slot k's dropout
  (drop{k}) follows conv{k}. When the shape changes the shortcut is
  proj_conv (WSConv 1x1, strided) applied to act(x) / beta.
  """
  features: int
  strides: int
  beta: float
  alpha: float = 0.2
  dropout_rates: tuple[float, float, float] = (0.0, 0.0, 0.0)

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               dropout_keep: Sequence[Array | None] = (None,) * 3) -> Array:
    out = _scaled_relu(x) / self.beta
    shortcut = x
    if self.strides != 1 or x.shape[-1] != 4 * self.features:
      shortcut = WSConv(4 * self.features, 1, self.strides,
                        name="proj_conv")(out)
    slots = ((self.features, 1, 1), (self.features, 3, self.strides),
             (4 * self.features, 1, 1))
    y = out
    for k, (features, kernel, strides) in enumerate(slots, start=1):
      if k > 1:
        y = _scaled_relu(y)
      y = WSConv(features, kernel, strides, name=f"conv{k}")(y)
      y = _dropout(self.dropout_rates[k - 1], y, train, f"drop{k}",
                   dropout_keep[k - 1])
    skip_gain = self.param("skip_gain", nn.initializers.zeros, ())
    return shortcut + y * (self.alpha * skip_gain)


class NFResNet(nn.Module):
  """Normalization-free bottleneck ResNet (NF-ResNet-50 layout, CIFAR stem).

  WSConv 3x3 stem (no max-pool), stages of NFBottleneck with widths
  width * (1, 2, 4, 8), final gamma-ReLU, global average pool, Dense
  `classifier`. It has no norm attribute: `config.model.norm` and
  `norm_layers` are ignored. Dropout slots as in ResNet50.
  """
  num_classes: int
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  alpha: float = 0.2
  dropout_rates: tuple[float, float, float] = (0.0, 0.0, 0.0)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    keep = tuple(_traced_keep(self, SLOT_DROPOUTS).values())
    x = WSConv(self.width, 3, name="stem_conv")(x)
    betas = nf_block_betas(self.stage_sizes, self.alpha)
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = NFBottleneck(self.width * 2**stage, strides, betas[stage][block],
                         self.alpha, self.dropout_rates,
                         name=f"stage{stage + 1}_block{block + 1}")(
                             x, train, keep)
    x = jnp.mean(_scaled_relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# Speedrun: airbench94 (Keller Jordan, github.com/KellerJordan/cifar10-airbench).

# PyTorch's default Conv2d / Linear init, kaiming_uniform(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                      "uniform")

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                  "float16": jnp.float16}


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


def patch_second_moment(images: np.ndarray, patch: int,
                        chunk: int = 512) -> tuple[np.ndarray, int]:
  """Sum of p p^T over every (patch x patch x C) window p of `images`
  (stride 1, valid), flattened in (h, w, c) order, in float64; and the
  number of windows. Uncentred, as airbench's covariance estimate."""
  images = np.asarray(images, np.float64)
  n, h, w, c = images.shape
  if h < patch or w < patch:
    raise ValueError(f"images of {h}x{w} are smaller than the {patch}x{patch} "
                     "whitening patch; lower config.model.whiten_patch")
  dim = patch * patch * c
  total = np.zeros((dim, dim))
  count = 0
  for start in range(0, n, chunk):
    x = images[start:start + chunk]
    windows = np.lib.stride_tricks.sliding_window_view(x, (patch, patch),
                                                       axis=(1, 2))
    # [b, H', W', c, ph, pw] -> rows in (ph, pw, c) order, the HWIO layout.
    rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
    total += rows.T @ rows
    count += len(rows)
  return total, count


def whitening_kernel(images_u8: np.ndarray, mean: Any, std: Any, *,
                     patch: int = 2, eps: float = 5e-4) -> np.ndarray:
  """airbench's patch-whitening conv kernel from uint8 NHWC images.

  Images are standardized as the model sees them, ((x / 255) - mean) / std;
  the second moment S = E[p p^T] of their patch x patch x C windows is
  decomposed as S = V diag(lambda) V^T (float64), and output channel k of
  the kernel is v_k / sqrt(lambda_k + eps), eigenvalues in descending order,
  followed by the same filters negated (so a GELU after it keeps both
  signs). The first half of the outputs thus has second moment
  diag(lambda / (lambda + eps)), the identity up to eps.

  Returns:
    float32 HWIO kernel [patch, patch, C, 2 * patch * patch * C].
  """
  images = np.asarray(images_u8)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"whitening_kernel needs uint8 [N, H, W, C] images, got "
                     f"{images.dtype} {images.shape}")
  x = (images.astype(np.float64) / 255.0 - np.asarray(mean, np.float64)) \
      / np.asarray(std, np.float64)
  total, count = patch_second_moment(x, patch)
  eigenvalues, eigenvectors = np.linalg.eigh(total / count)
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
  filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
  c = images.shape[-1]
  kernel = filters.reshape(patch, patch, c, -1)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


class AirbenchBlock(nn.Module):
  """conv3x3 -> 2x2 max-pool -> norm -> GELU -> conv3x3 -> norm -> GELU
  (airbench's ConvGroup; convs without bias, identity-initialised)."""
  features: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for k in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False,
                  dtype=self.dtype, kernel_init=dirac_init(),
                  name=f"conv{k}")(x)
      if k == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = self.norm(name=f"norm{k}")(x, train=train)
      # PyTorch's nn.GELU is the exact (erf) one.
      x = nn.gelu(x, approximate=False)
    return x


class Airbench(nn.Module):
  """airbench94's network (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds").

  whiten (patch x patch conv, 2 * patch^2 * C outputs, VALID, with bias;
  its kernel comes from `data_init` and is meant to stay frozen) -> GELU ->
  three AirbenchBlocks of widths width * (1, 4, 4) -> 3x3 max-pool (stride
  3; on CIFAR the 3x3 map that is left, so a global max) -> global max over
  what remains -> Dense `classifier` (no bias) -> logits * logit_scale.

  Convs and the classifier use PyTorch's default init, block convs with
  identity (dirac) init on their first C_in outputs, as the reference.
  Norms, their affine parameters and the logits stay float32; convs and the
  classifier compute in `dtype` (airbench: float16 everywhere but the BN).
  """
  num_classes: int
  norm: ModuleDef
  width: int = 64
  logit_scale: float = 1.0 / 9.0
  whiten_patch: int = 2
  whiten_eps: float = 5e-4
  whiten_images: int = 5000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    p = self.whiten_patch
    channels = 2 * p * p * x.shape[-1]
    x = nn.Conv(channels, (p, p), padding="VALID", use_bias=True,
                dtype=self.dtype, kernel_init=torch_default_init,
                name="whiten")(x.astype(self.dtype))
    x = nn.gelu(x, approximate=False)
    for i, mult in enumerate((1, 4, 4), start=1):
      x = AirbenchBlock(self.width * mult, self.norm, self.dtype,
                        name=f"block{i}")(x, train)
    if min(x.shape[1:3]) >= 3:
      x = nn.max_pool(x, (3, 3), strides=(3, 3))
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                 kernel_init=torch_default_init, name="classifier")(x)
    return x.astype(jnp.float32) * self.logit_scale

  def data_init(self, params: Any, images_u8: np.ndarray, mean: Any,
                std: Any) -> Any:
    """`params` with whiten/kernel set from the first `whiten_images`
    training images (see `whitening_kernel`) and whiten/bias zeroed."""
    kernel = whitening_kernel(images_u8[:self.whiten_images], mean, std,
                              patch=self.whiten_patch, eps=self.whiten_eps)
    old = params["whiten"]
    if old["kernel"].shape != kernel.shape:
      raise ValueError(f"whitening kernel {kernel.shape} does not fit the "
                       f"model's whiten/kernel {old['kernel'].shape}: the "
                       "images and the model disagree on channels")
    whiten = {"kernel": jnp.asarray(kernel),
              "bias": jnp.zeros_like(old["bias"])}
    return {**params, "whiten": whiten}


# --------------------------------------------------------------------------
# Registry, config and building.

Builder = Callable[[ml_collections.ConfigDict, int, ModuleDef], nn.Module]
MODELS: Registry[Builder] = Registry("model")

# Models whose architecture has no norm slot at all (config.model.norm is
# validated but unused).
NORM_FREE_MODELS = frozenset({"nf_resnet"})


# Models with one dropout rate per bottleneck slot (SLOT_DROPOUTS), and
# without dropout; the others have one rate, "dropout", for every slot.
_SLOT_DROPOUT_MODELS = frozenset({"resnet50", "nf_resnet"})
_NO_DROPOUT_MODELS = frozenset({"airbench"})


def _slot_rates(cfg: ml_collections.ConfigDict) -> tuple[float, float, float]:
  """Dropout probability of each bottleneck slot: the first dropout_layers
  slots get dropout_per_slot if set (it wins over dropout), else dropout."""
  k = cfg.dropout_layers
  rates = (tuple(float(p) for p in cfg.dropout_per_slot)
           if cfg.dropout_per_slot is not None else (float(cfg.dropout),) * k)
  return rates + (0.0,) * (3 - k)


def dropout_keep(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The DROPOUT_COLLECTION of `config.model`'s dropout rates.

  {"dropout": 1 - dropout} for models with one rate; for resnet50 and
  nf_resnet {"drop<k>": 1 - rate of slot k} for the first dropout_layers
  slots (dropout_per_slot, else dropout); {} for airbench. float32 scalars
  rounded once from float64, as nn.Dropout's keep probability is. Passed
  to a model built from a config that differs at most in the rates, it
  makes that model train as one built from `model_cfg` does (module
  docstring), so the rates can be traced.
  """
  name = model_cfg.name
  MODELS.get(name)  # Unknown names list the valid ones.
  if name in _NO_DROPOUT_MODELS:
    return {}
  if name in _SLOT_DROPOUT_MODELS:
    rates = _slot_rates(model_cfg)[:model_cfg.dropout_layers]
    return {n: np.float32(1.0 - p) for n, p in zip(SLOT_DROPOUTS, rates)}
  return {"dropout": np.float32(1.0 - float(model_cfg.dropout))}


@MODELS.register("mnist_cnn")
def _build_mnist_cnn(cfg, num_classes, norm):
  return MnistCNN(num_classes, norm, dropout=float(cfg.dropout),
                  conv_impl=str(cfg.conv_impl))


@MODELS.register("cifar_resnet")
def _build_cifar_resnet(cfg, num_classes, norm):
  return CifarResNet(num_classes, norm, depth=int(cfg.depth),
                     dropout=float(cfg.dropout))


@MODELS.register("resnet50")
def _build_resnet50(cfg, num_classes, norm):
  return ResNet50(num_classes, norm,
                  stage_sizes=tuple(int(s) for s in cfg.stage_sizes),
                  width=int(cfg.width), norm_layers=int(cfg.norm_layers),
                  dropout_rates=_slot_rates(cfg))


@MODELS.register("resnet9")
def _build_resnet9(cfg, num_classes, norm):
  return ResNet9(num_classes, norm, width=int(cfg.width),
                 logit_scale=float(cfg.logit_scale),
                 dropout=float(cfg.dropout))


@MODELS.register("nf_resnet")
def _build_nf_resnet(cfg, num_classes, norm):
  del norm  # Normalization-free by construction.
  return NFResNet(num_classes,
                  stage_sizes=tuple(int(s) for s in cfg.stage_sizes),
                  width=int(cfg.width), alpha=float(cfg.nf_alpha),
                  dropout_rates=_slot_rates(cfg))


@MODELS.register("airbench")
def _build_airbench(cfg, num_classes, norm):
  return Airbench(num_classes, norm, width=int(cfg.width),
                  logit_scale=float(cfg.logit_scale),
                  whiten_patch=int(cfg.whiten_patch),
                  whiten_eps=float(cfg.whiten_eps),
                  whiten_images=int(cfg.whiten_images),
                  dtype=COMPUTE_DTYPES[cfg.dtype])


def default_config() -> ml_collections.ConfigDict:
  """config.model: every option of every model, with its default."""
  cfg = ml_collections.ConfigDict()
  cfg.name = "mnist_cnn"  # One of MODELS.names().
  cfg.norm = "batch"  # One of norms.NORMS.names(); ignored by nf_resnet.
  cfg.norm_kwargs = norms.norm_kwargs_config()
  # Dropout probability: every mnist_cnn block, between the convs of every
  # cifar_resnet block, inside resnet9's residuals, and in the first
  # dropout_layers slots of resnet50 / nf_resnet bottlenecks.
  cfg.dropout = 0.0
  # resnet50 / nf_resnet: one probability per dropout slot (exactly
  # dropout_layers of them, e.g. (0.1, 0.2, 0.3)); when set it wins over
  # `dropout`.
  cfg.dropout_per_slot = config_dict.placeholder(tuple)
  cfg.norm_layers = 3  # resnet50: first k of the 3 bottleneck slots get a norm.
  cfg.dropout_layers = 0  # resnet50 / nf_resnet: first k slots get dropout.
  cfg.depth = 14  # cifar_resnet: 6n+2.
  cfg.stage_sizes = (3, 4, 6, 3)  # resnet50 / nf_resnet blocks per stage.
  # resnet50 / nf_resnet / resnet9 / airbench base channel width.
  cfg.width = 64
  cfg.logit_scale = 0.125  # resnet9 / airbench logits multiplier.
  cfg.nf_alpha = 0.2  # nf_resnet residual branch scale.
  # airbench: side of the whitening conv's patches, the eps added to their
  # eigenvalues, and how many (first) training images estimate them.
  cfg.whiten_patch = 2
  cfg.whiten_eps = 5e-4
  cfg.whiten_images = 5000
  # airbench: dtype its convs and classifier compute in (params, norms and
  # logits stay float32); one of COMPUTE_DTYPES.
  cfg.dtype = "float32"
  # mnist_cnn: how its convs are computed, one of fastconv.CONV_IMPLS
  # ("auto": matrix-product convs where they measured faster on CPU,
  # bench/conv_impl.py; "xla": nn.Conv everywhere; "slices": everywhere).
  cfg.conv_impl = "auto"
  return cfg


def _validate(cfg: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses bad options before anything is traced."""
  MODELS.get(cfg.name)  # Unknown names list the valid ones.
  fastconv.check_conv_impl(cfg.conv_impl)
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(
        f"num_classes={num_classes!r}: a classifier needs an integer >= 2 "
        "classes; check the dataset's label count")
  for key in ("norm_layers", "dropout_layers"):
    value = cfg[key]
    if not isinstance(value, int) or not 0 <= value <= 3:
      raise ValueError(
          f"config.model.{key}={value!r}: set it to an integer in 0..3 (how "
          "many of the three bottleneck conv slots it applies to)")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(
        f"config.model.dropout={cfg.dropout!r}: set a probability in [0, 1)")
  if cfg.dropout_per_slot is not None:
    rates = tuple(cfg.dropout_per_slot)
    if len(rates) != cfg.dropout_layers:
      raise ValueError(
          f"config.model.dropout_per_slot={rates!r} has {len(rates)} "
          f"values but dropout_layers={cfg.dropout_layers}: give exactly one "
          "probability per dropout slot, or change dropout_layers")
    if not all(0.0 <= p < 1.0 for p in rates):
      raise ValueError(
          f"config.model.dropout_per_slot={rates!r}: every probability must "
          "be in [0, 1)")
  depth = cfg.depth
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f"config.model.depth={depth!r}: cifar_resnet needs depth = 6n+2 with "
        "n >= 1 (8, 14, 20, 32, 44, 56, 110)")
  sizes = tuple(cfg.stage_sizes)
  if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
    raise ValueError(
        f"config.model.stage_sizes={sizes!r}: give a non-empty tuple of "
        "positive block counts, e.g. (3, 4, 6, 3)")
  if not isinstance(cfg.width, int) or cfg.width < 1:
    raise ValueError(
        f"config.model.width={cfg.width!r}: set a positive integer")
  if not cfg.logit_scale > 0:
    raise ValueError(
        f"config.model.logit_scale={cfg.logit_scale!r}: set a positive number")
  if not cfg.nf_alpha > 0:
    raise ValueError(
        f"config.model.nf_alpha={cfg.nf_alpha!r}: set a positive number")
  for key in ("whiten_patch", "whiten_images"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(
          f"config.model.{key}={cfg[key]!r}: set a positive integer")
  if not cfg.whiten_eps > 0:
    raise ValueError(
        f"config.model.whiten_eps={cfg.whiten_eps!r}: set a positive number")
  if cfg.dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"config.model.dtype={cfg.dtype!r}: valid choices: "
        f"{', '.join(COMPUTE_DTYPES)}")


def build_model(model_cfg: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """Validates `config.model` and builds the named model.

  The norm is resolved once (name and options checked even for models that
  do not use it), so every bad option fails here, before any tracing.
  """
  _validate(model_cfg, num_classes)
  norm = norms.make_norm_from_config(model_cfg.norm, model_cfg.norm_kwargs)
  if model_cfg.name == "mnist_cnn" and model_cfg.norm == "instance":
    # S3's block order puts the last norm right before global average
    # pooling; the spatial mean of an instance-normalized map is its bias.
    logging.warning(
        "mnist_cnn with norm=instance: the last block's instance norm sits "
        "right before global average pooling, whose output is then the "
        "norm's bias for every input, so the logits cannot depend on the "
        "image and accuracy stays at chance. This is the S3 layer order, "
        "kept as specified; use batch_instance, layer or group to compare.")
  return MODELS.get(model_cfg.name)(model_cfg, int(num_classes), norm)


# --------------------------------------------------------------------------
# Introspection.


def _as_batch_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 3:
    return (1,) + shape
  if len(shape) == 4:
    return shape
  raise ValueError(f"input_shape={shape}: give (H, W, C) or (B, H, W, C)")


def _abstract_init(model: nn.Module, input_shape: Sequence[int], **kwargs):
  x = jax.ShapeDtypeStruct(_as_batch_shape(input_shape), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, **kwargs), x)


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of trainable parameters (the `params` collection), from shapes
  only: no compile and no allocation. `input_shape` is (H, W, C)."""
  params = _abstract_init(model, input_shape)["params"]
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def feature_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
  """Paths ("stage1_block1/norm2") of every submodule, in the order their
  outputs are computed (a block after its layers); any of them can be
  passed to `capture_features`. Traces shapes only."""
  order: list[str] = []

  def record(module: nn.Module, method_name: str) -> bool:
    path = "/".join(module.path)
    if method_name == "__call__" and path and path not in order:
      order.append(path)
    return False  # Record the path only; store nothing.

  _abstract_init(model, input_shape, capture_intermediates=record)
  return order


def capture_features(model: nn.Module, variables: Any, x: Array,
                     layer: str) -> Array:
  """Output of submodule `layer` (a path from `feature_layers`) on `x` in
  eval mode (running statistics, no dropout). Model code is untouched:
  flax's capture_intermediates records only the module whose path matches.
  A module called more than once returns its first output."""

  def only_layer(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and "/".join(module.path) == layer

  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  _, state = model.apply(variables, x, train=False,
                         capture_intermediates=only_layer,
                         mutable=["intermediates"])
  node = state.get("intermediates", {})
  for part in layer.split("/") if layer else ():
    node = node.get(part, {}) if isinstance(node, dict) else {}
  if not layer or "__call__" not in node:
    choices = feature_layers(model, x.shape)
    raise ValueError(f"unknown feature layer {layer!r}; valid choices: "
                     f"{', '.join(choices)}")
  return node["__call__"][0]


def main() -> None:
  """Prints each model's parameter count at its default config."""
  shapes = (((28, 28, 1), 10), ((32, 32, 3), 10))
  header = f"{'model':<14}" + "".join(
      f"{'x'.join(map(str, s))}/{k} classes".rjust(24) for s, k in shapes)
  print(header)
  for name in MODELS.names():
    cfg = default_config()
    cfg.name = name
    counts = [count_params(build_model(cfg, k), s) for s, k in shapes]
    print(f"{name:<14}" + "".join(f"{c:>24,}" for c in counts))


if __name__ == "__main__":
  main()
