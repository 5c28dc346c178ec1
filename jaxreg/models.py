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

Models:
  mnist_cnn     S3: small all-convolutional "EVA" network (~11k params).
  cifar_resnet  S4: ResNet 6n+2 of He et al. 2016, option A shortcuts.
  resnet50      S1/S2: bottleneck ResNet-50 with a CIFAR stem and
                per-slot control of norm and dropout layers.
  resnet9       S5: DavidNet / Myrtle ResNet-9 (~6.57M params).
  nf_resnet     S2: normalization-free bottleneck ResNet-50 (NF-ResNet).

Convolutions use Flax's default initializer (LeCun normal); a conv directly
followed by a norm slot has no bias, one without a norm slot has a bias.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

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


def _dropout(rate: float, x: Array, train: bool, name: str) -> Array:
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

  # (name, out channels, padding) of the 3x3 conv blocks; "pool" marks a
  # 1x1 transition conv followed by a max-pool.
  layout: Sequence[tuple[str, int, str]] = (
      ("1", 8, "VALID"), ("2", 16, "VALID"), ("pool", 8, ""),
      ("3", 16, "VALID"), ("4", 16, "VALID"), ("5", 16, "VALID"),
      ("pool", 8, ""), ("6", 16, "SAME"), ("7", 16, "SAME"))

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    transitions = 0
    for tag, features, padding in self.layout:
      if tag == "pool":
        transitions += 1
        x = nn.Conv(features, (1, 1), use_bias=False,
                    name=f"trans{transitions}")(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(features, (3, 3), padding=padding, use_bias=False,
                  name=f"conv{tag}")(x)
      x = nn.relu(x)
      x = _dropout(self.dropout, x, train, f"drop{tag}")
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
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = _conv(self.features, 3, self.strides, use_bias=False, name="conv1")(x)
    y = self.norm(name="norm1")(y, train=train)
    y = nn.relu(y)
    y = _dropout(self.dropout, y, train, "drop1")
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
    x = _conv(16, 3, use_bias=False, name="stem_conv")(x)
    x = self.norm(name="stem_norm")(x, train=train)
    x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.norm, self.dropout,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# S1/S2: bottleneck ResNet-50 with per-slot norm and dropout.


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (4x features) bottleneck, + shortcut.

  Slot k (1-based) is conv{k} -> [norm{k} if k <= norm_layers] -> ReLU
  (slots 1, 2 only) -> [drop{k} if dropout_rates[k-1] > 0]. Slot 3's
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
  def __call__(self, x: Array, train: bool = False) -> Array:
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
      y = _dropout(self.dropout_rates[k - 1], y, train, f"drop{k}")
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
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
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
          y = _dropout(self.dropout, y, train, f"layer{layer}_res{r}_drop")
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
  def __call__(self, x: Array, train: bool = False) -> Array:
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
      y = _dropout(self.dropout_rates[k - 1], y, train, f"drop{k}")
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
    x = WSConv(self.width, 3, name="stem_conv")(x)
    betas = nf_block_betas(self.stage_sizes, self.alpha)
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = NFBottleneck(self.width * 2**stage, strides, betas[stage][block],
                         self.alpha, self.dropout_rates,
                         name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(_scaled_relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# --------------------------------------------------------------------------
# Registry, config and building.

Builder = Callable[[ml_collections.ConfigDict, int, ModuleDef], nn.Module]
MODELS: Registry[Builder] = Registry("model")

# Models whose architecture has no norm slot at all (config.model.norm is
# validated but unused).
NORM_FREE_MODELS = frozenset({"nf_resnet"})


def _slot_rates(cfg: ml_collections.ConfigDict) -> tuple[float, float, float]:
  """Dropout probability of each bottleneck slot: the first dropout_layers
  slots get dropout_per_slot if set (it wins over dropout), else dropout."""
  k = cfg.dropout_layers
  rates = (tuple(float(p) for p in cfg.dropout_per_slot)
           if cfg.dropout_per_slot is not None else (float(cfg.dropout),) * k)
  return rates + (0.0,) * (3 - k)


@MODELS.register("mnist_cnn")
def _build_mnist_cnn(cfg, num_classes, norm):
  return MnistCNN(num_classes, norm, dropout=float(cfg.dropout))


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
  cfg.width = 64  # resnet50 / nf_resnet / resnet9 base channel width.
  cfg.logit_scale = 0.125  # resnet9 logits multiplier.
  cfg.nf_alpha = 0.2  # nf_resnet residual branch scale.
  return cfg


def _validate(cfg: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses bad options before anything is traced."""
  MODELS.get(cfg.name)  # Unknown names list the valid ones.
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


def build_model(model_cfg: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """Validates `config.model` and builds the named model.

  The norm is resolved once (name and options checked even for models that
  do not use it), so every bad option fails here, before any tracing.
  """
  _validate(model_cfg, num_classes)
  norm = norms.make_norm_from_config(model_cfg.norm, model_cfg.norm_kwargs)
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
