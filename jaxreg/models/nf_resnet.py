"""S2: the normalization-free bottleneck ResNet-50 (Brock et al. 2021a,
"NF-ResNets"): scaled weight-standardized convs, variance-preserving
activations and SkipInit residual gains instead of norm layers."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxreg.models import layers
from jaxreg.models import options

Array = layers.Array
WSConv = layers.WSConv

# Fixed-variance ReLU: gamma * relu(z) has unit variance for z ~ N(0, 1)
# (Brock et al. 2021a): Var[relu(z)] = (1 - 1/pi) / 2. The closed form; the
# DeepMind and timm code bake an empirical 1.7139588594 (0.06% larger).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


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
    y = out
    for k, features, kernel, strides in layers.bottleneck_slots(
        self.features, self.strides):
      if k > 1:
        y = _scaled_relu(y)
      y = WSConv(features, kernel, strides, name=f"conv{k}")(y)
      y = layers.dropout(self.dropout_rates[k - 1], y, train, f"drop{k}",
                         dropout_keep[k - 1])
    skip_gain = self.param("skip_gain", nn.initializers.zeros, ())
    return shortcut + y * (self.alpha * skip_gain)


class NFResNet(nn.Module):
  """Normalization-free bottleneck ResNet (NF-ResNet-50 layout, CIFAR stem).

  WSConv 3x3 stem (no max-pool), stages of NFBottleneck with widths
  width * (1, 2, 4, 8), final gamma-ReLU, global average pool, Dense
  `classifier`. It has no norm attribute (it reads no norm option).
  Dropout slots as in ResNet50.
  """
  num_classes: int
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  alpha: float = 0.2
  dropout_rates: tuple[float, float, float] = (0.0, 0.0, 0.0)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    keep = tuple(layers.traced_keep(self, layers.SLOT_DROPOUTS).values())
    x = WSConv(self.width, 3, name="stem_conv")(x)
    betas = nf_block_betas(self.stage_sizes, self.alpha)
    for stage, block, strides, name in layers.residual_blocks(
        self.stage_sizes):
      x = NFBottleneck(self.width * 2**stage, strides, betas[stage][block],
                       self.alpha, self.dropout_rates, name=name)(
                           x, train, keep)
    x = jnp.mean(_scaled_relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


# norm="none" and norm_layers=0 say what nf_resnet is, so a study that
# swaps resnet50 for it (S2's agc.py:nf, norm_layers=0) keeps them.
@options.register("nf_resnet", {"stage_sizes": options.block_counts,
                                "width": options.positive_int,
                                "nf_alpha": options.positive_number},
                  norm=False, dropout="slots",
                  tolerated={"norm": ("none",), "norm_layers": (0,)})
def _build_nf_resnet(cfg, num_classes, norm):
  del norm  # Normalization-free by construction.
  return NFResNet(num_classes,
                  stage_sizes=tuple(int(s) for s in cfg.stage_sizes),
                  width=int(cfg.width), alpha=float(cfg.nf_alpha),
                  dropout_rates=options.slot_rates(cfg, pad=True))
