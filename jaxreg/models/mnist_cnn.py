"""S3: the small all-convolutional "EVA" network for 28x28 digits."""
from __future__ import annotations

from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreg import fastconv
from jaxreg.models import layers
from jaxreg.models import options

Array = layers.Array


class MnistCNN(nn.Module):
  """All-convolutional "EVA" style network for 28x28 digits (~11k params).

  Blocks are conv(3x3, no bias) -> ReLU -> dropout -> norm. Two 1x1
  transition convs (linear, channels 16 -> 8) each precede a 2x2 max-pool.
  The first two stages use valid padding (28 -> 26 -> 24 -> pool 12 -> 10 ->
  8 -> 6 -> pool 3), the last stage same padding so 32x32 inputs also work
  (32 -> ... -> 4). Global average pool, then a Dense `classifier`.
  """
  num_classes: int
  norm: layers.ModuleDef
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
    keep = layers.traced_keep(self, ("dropout",))["dropout"]
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
      x = layers.dropout(self.dropout, x, train, f"drop{tag}", keep)
      x = self.norm(name=f"norm{tag}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


def _check_conv_impl(cfg, key: str) -> None:
  fastconv.check_conv_impl(cfg[key])


@options.register("mnist_cnn", {"conv_impl": _check_conv_impl})
def _build_mnist_cnn(cfg, num_classes, norm):
  if cfg.norm == "instance":
    # S3's block order puts the last norm right before global average
    # pooling; the spatial mean of an instance-normalized map is its bias.
    logging.warning(
        "mnist_cnn with norm=instance: the last block's instance norm sits "
        "right before global average pooling, whose output is then the "
        "norm's bias for every input, so the logits cannot depend on the "
        "image and accuracy stays at chance. This is the S3 layer order, "
        "kept as specified; use batch_instance, layer or group to compare.")
  return MnistCNN(num_classes, norm, dropout=float(cfg.dropout),
                  conv_impl=str(cfg.conv_impl))
