"""Erasing ops: cutout, cutout copies appended to the batch, random erasing.

All erase boxes through `box_mask`, so boxes of traced position and size keep
static shapes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxreg.augment.base import Array, Op, register
from jaxreg.augment.spec import (check_int, check_prob, check_range,
                                 is_number, option_label)


def box_mask(top: Array, left: Array, height, width, hw: tuple[int, int]
             ) -> Array:
  """[B, H, W] mask of the boxes rows [top, top+height), cols [left, ...).

  Built from iota comparisons so that boxes of traced position and size keep
  a static shape; parts outside the image simply match no pixel (clipping).
  """
  rows = jnp.arange(hw[0])[None, :, None]
  cols = jnp.arange(hw[1])[None, None, :]
  top, left = top[:, None, None], left[:, None, None]
  height = jnp.asarray(height)
  width = jnp.asarray(width)
  if height.ndim:
    height, width = height[:, None, None], width[:, None, None]
  return ((rows >= top) & (rows < top + height)
          & (cols >= left) & (cols < left + width))


def cutout(key: Array, images: Array, size: int) -> tuple[Array, Array]:
  """Zeroes a size x size square per example; returns (images, mask).

  As DeVries & Taylor: the centre is uniform over all pixels and the square
  is clipped at the borders, so squares near an edge erase less.
  """
  b, h, w, _ = images.shape
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (b,), 0, h)
  cx = jax.random.randint(kx, (b,), 0, w)
  # For even sizes this is the reference's [c - size/2, c + size/2); odd
  # sizes keep exactly `size` pixels instead of the reference's size - 1.
  mask = box_mask(cy - size // 2, cx - size // 2, size, size, (h, w))
  return jnp.where(mask[..., None], jnp.zeros((), images.dtype), images), mask


@register("cutout")
@dataclasses.dataclass(frozen=True)
class Cutout(Op):
  """Cutout (DeVries & Taylor 2017) applied to each example with prob. p."""
  size: int = 8
  p: float = 1.0

  def __post_init__(self):
    check_int(self.name, "size", self.size, 1)
    object.__setattr__(self, "p", check_prob(self.name, "p", self.p))

  def check_image(self, image_shape):
    if self.size > min(image_shape[:2]):
      raise ValueError(
          f"{option_label(self.name, 'size')}={self.size} is larger than the "
          f"image ({image_shape[0]}x{image_shape[1]})")

  def __call__(self, key, images, labels):
    k_cut, k_apply = jax.random.split(key)
    cut, _ = cutout(k_cut, images, self.size)
    apply = jax.random.bernoulli(k_apply, self.p, (images.shape[0],))
    return jnp.where(apply[:, None, None, None], cut, images), labels


@register("cutout_extra")
@dataclasses.dataclass(frozen=True)
class CutoutExtra(Op):
  """Appends cutout copies of n distinct random batch members (study S1).

  The batch grows from B to B + n; the copies keep their labels.
  """
  n: int = 4
  size: int = 8

  def __post_init__(self):
    check_int(self.name, "n", self.n, 1)
    check_int(self.name, "size", self.size, 1)

  def check_image(self, image_shape):
    Cutout.check_image(self, image_shape)

  def batch_growth(self):
    return self.n

  def __call__(self, key, images, labels):
    b = images.shape[0]
    if self.n > b:
      raise ValueError(
          f"{option_label(self.name, 'n')}={self.n} exceeds the batch size "
          f"{b}")
    k_pick, k_cut = jax.random.split(key)
    picked = jax.random.choice(k_pick, b, (self.n,), replace=False)
    extra, _ = cutout(k_cut, images[picked], self.size)
    return (jnp.concatenate([images, extra]),
            jnp.concatenate([labels, labels[picked]]))


@register("random_erasing")
@dataclasses.dataclass(frozen=True)
class RandomErasing(Op):
  """Random erasing (Zhong et al. 2020), torchvision RandomErasing semantics.

  With probability p, up to 10 tries draw an area fraction uniform in
  `scale` and a log-uniform aspect ratio (height / width) in `ratio`; the
  first box that fits strictly inside the image (h < H, w < W) is placed
  uniformly and set to `value` (a number, or one per channel). If no try
  fits, the example is left alone. The tries are drawn together and the
  first fit picked with argmax, so shapes stay static.
  """
  p: float = 0.5
  scale: tuple = (0.02, 0.33)
  ratio: tuple = (0.3, 3.3)
  value: Any = 0.0

  TRIES: ClassVar[int] = 10

  def __post_init__(self):
    object.__setattr__(self, "p", check_prob(self.name, "p", self.p))
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("scale", check_range(self.name, "scale", self.scale, 0.0, 1.0, True))
    set_("ratio", check_range(self.name, "ratio", self.ratio, 0.0, math.inf,
                              True))
    v = self.value
    if isinstance(v, (tuple, list)) and v and all(is_number(x) for x in v):
      set_("value", tuple(float(x) for x in v))
    elif is_number(v):
      set_("value", float(v))
    else:
      raise ValueError(
          f"{option_label(self.name, 'value')} must be a number or one "
          f"number per channel, got {v!r}")

  def check_image(self, image_shape):
    if isinstance(self.value, tuple) and len(self.value) != image_shape[2]:
      raise ValueError(
          f"{option_label(self.name, 'value')} has {len(self.value)} entries "
          f"but the images have {image_shape[2]} channels")

  def __call__(self, key, images, labels):
    b, h, w, _ = images.shape
    k_apply, k_area, k_ratio, k_top, k_left = jax.random.split(key, 5)
    shape = (b, self.TRIES)
    area = h * w * jax.random.uniform(
        k_area, shape, minval=self.scale[0], maxval=self.scale[1])
    aspect = jnp.exp(jax.random.uniform(
        k_ratio, shape, minval=math.log(self.ratio[0]),
        maxval=math.log(self.ratio[1])))
    # jnp.round halves to even, like Python's round in torchvision.
    eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (eh < h) & (ew < w)
    first = jnp.argmax(fits, axis=1)[:, None]
    eh = jnp.take_along_axis(eh, first, axis=1)[:, 0]
    ew = jnp.take_along_axis(ew, first, axis=1)[:, 0]
    top = jax.random.randint(k_top, (b,), 0, h - eh + 1)
    left = jax.random.randint(k_left, (b,), 0, w - ew + 1)
    apply = (jax.random.bernoulli(k_apply, self.p, (b,))
             & jnp.any(fits, axis=1))
    mask = apply[:, None, None] & box_mask(top, left, eh, ew, (h, w))
    value = jnp.asarray(self.value, images.dtype)
    return jnp.where(mask[..., None], value, images), labels
