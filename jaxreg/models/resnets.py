"""ResNets with norm slots: S4's CIFAR ResNet 6n+2, S1/S2's bottleneck
ResNet-50 (per-slot norm and dropout) and S5's ResNet-9 (DavidNet)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxreg import fastconv
from jaxreg.models import layers
from jaxreg.models import options

Array = layers.Array
ModuleDef = layers.ModuleDef


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
  conv_impl: str = "xla"  # fastconv.CONV_IMPLS, for the stride-1 convs.

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               dropout_keep: Array | None = None) -> Array:
    y = layers.conv(self.features, 3, self.strides, use_bias=False,
                    name="conv1", impl=self.conv_impl,
                    in_features=x.shape[-1])(x)
    y = self.norm(name="norm1")(y, train=train)
    y = nn.relu(y)
    y = layers.dropout(self.dropout, y, train, "drop1", dropout_keep)
    y = layers.conv(self.features, 3, use_bias=False, name="conv2",
                    impl=self.conv_impl, in_features=y.shape[-1])(y)
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
  # How the stride-1 convs are computed (fastconv.CONV_IMPLS); the same
  # parameters either way.
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    n = (self.depth - 2) // 6
    keep = layers.traced_keep(self, ("dropout",))["dropout"]
    x = layers.conv(16, 3, use_bias=False, name="stem_conv",
                    impl=self.conv_impl, in_features=x.shape[-1])(x)
    x = self.norm(name="stem_norm")(x, train=train)
    x = nn.relu(x)
    for stage, _, strides, name in layers.residual_blocks((n, n, n)):
      x = BasicBlock(16 * 2**stage, strides, self.norm, self.dropout,
                     self.conv_impl, name=name)(x, train, keep)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


def _check_depth(cfg, key: str) -> None:
  depth = cfg[key]
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f"config.model.{key}={depth!r}: cifar_resnet needs depth = 6n+2 with "
        "n >= 1 (8, 14, 20, 32, 44, 56, 110)")


def _check_conv_impl(cfg, key: str) -> None:
  fastconv.check_conv_impl(cfg[key])


def _conv_impl(cfg) -> str:
  """The ResNets' conv_impl: "auto" is nn.Conv everywhere. Measured on the
  2-core CPU (bench/README.md, ResNet-14 step): SliceConv for every
  stride-1 conv 2.2x slower, and fastconv's S3 rule (SliceConv for the
  one-channel stem) within noise of nn.Conv, so no layer takes it."""
  return "xla" if cfg.conv_impl == "auto" else str(cfg.conv_impl)


@options.register("cifar_resnet", {"depth": _check_depth,
                                   "conv_impl": _check_conv_impl})
def _build_cifar_resnet(cfg, num_classes, norm):
  return CifarResNet(num_classes, norm, depth=int(cfg.depth),
                     dropout=float(cfg.dropout),
                     conv_impl=_conv_impl(cfg))


# --------------------------------------------------------------------------
# S1/S2: bottleneck ResNet-50 with per-slot norm and dropout.


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
    y = x
    for k, features, kernel, strides in layers.bottleneck_slots(
        self.features, self.strides):
      has_norm = k <= self.norm_layers
      y = layers.conv(features, kernel, strides, use_bias=not has_norm,
                      name=f"conv{k}")(y)
      if has_norm:
        y = self.norm(name=f"norm{k}")(y, train=train)
      if k < 3:
        y = nn.relu(y)
      y = layers.dropout(self.dropout_rates[k - 1], y, train, f"drop{k}",
                         dropout_keep[k - 1])
    shortcut = x
    if x.shape != y.shape:
      has_norm = self.norm_layers > 0
      shortcut = layers.conv(4 * self.features, 1, self.strides,
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
    keep = tuple(layers.traced_keep(self, layers.SLOT_DROPOUTS).values())
    has_norm = self.norm_layers > 0
    x = layers.conv(self.width, 3, use_bias=not has_norm, name="stem_conv")(x)
    if has_norm:
      x = self.norm(name="stem_norm")(x, train=train)
    x = nn.relu(x)
    for stage, _, strides, name in layers.residual_blocks(self.stage_sizes):
      x = Bottleneck(self.width * 2**stage, strides, self.norm,
                     self.norm_layers, self.dropout_rates, name=name)(
                         x, train, keep)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


@options.register("resnet50", {"stage_sizes": options.block_counts,
                               "width": options.positive_int,
                               "norm_layers": options.slot_count},
                  dropout="slots")
def _build_resnet50(cfg, num_classes, norm):
  return ResNet50(num_classes, norm,
                  stage_sizes=tuple(int(s) for s in cfg.stage_sizes),
                  width=int(cfg.width), norm_layers=int(cfg.norm_layers),
                  dropout_rates=options.slot_rates(cfg, pad=True))


# --------------------------------------------------------------------------
# S5: ResNet-9 (DavidNet).


class ConvUnit(nn.Module):
  """conv3x3 (no bias) -> norm -> ReLU -> [2x2 max-pool]."""
  features: int
  norm: ModuleDef
  pool: bool = False
  conv_impl: str = "xla"  # fastconv.CONV_IMPLS

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = layers.conv(self.features, 3, use_bias=False, name="conv",
                    impl=self.conv_impl, in_features=x.shape[-1])(x)
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
  conv_impl: str = "xla"  # fastconv.CONV_IMPLS; the same parameters.

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    w = self.width
    impl = self.conv_impl
    keep = layers.traced_keep(self, ("dropout",))["dropout"]
    x = ConvUnit(w, self.norm, conv_impl=impl, name="prep")(x, train)
    for layer, features, residual in ((1, 2 * w, True), (2, 4 * w, False),
                                      (3, 8 * w, True)):
      x = ConvUnit(features, self.norm, pool=True, conv_impl=impl,
                   name=f"layer{layer}")(x, train)
      if residual:
        y = x
        for r in (1, 2):
          y = ConvUnit(features, self.norm, conv_impl=impl,
                       name=f"layer{layer}_res{r}")(y, train)
          y = layers.dropout(self.dropout, y, train,
                             f"layer{layer}_res{r}_drop", keep)
        x = x + y
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, name="classifier")(x)
    return x * self.logit_scale


@options.register("resnet9", {"width": options.positive_int,
                              "logit_scale": options.positive_number,
                              "conv_impl": _check_conv_impl})
def _build_resnet9(cfg, num_classes, norm):
  return ResNet9(num_classes, norm, width=int(cfg.width),
                 logit_scale=float(cfg.logit_scale),
                 dropout=float(cfg.dropout), conv_impl=_conv_impl(cfg))
