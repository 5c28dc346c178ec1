"""Geometric ops: random crops of a padded image, mirroring, rotation."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import ndimage

from jaxreg.augment.base import Array, Op, register
from jaxreg.augment.spec import (check_int, check_prob, check_range,
                                 option_label)


@register("pad_crop")
@dataclasses.dataclass(frozen=True)
class PadCrop(Op):
  """Pads by `pad` on every side, then crops a random HxW window per example.

  Offsets are uniform over the (2 pad + 1)^2 windows (torchvision RandomCrop
  with padding). `mode` is a numpy/jnp.pad mode; "constant" pads with 0.
  """
  pad: int = 4
  mode: str = "reflect"

  MODES: ClassVar[tuple[str, ...]] = ("constant", "edge", "reflect",
                                      "symmetric")

  def __post_init__(self):
    check_int(self.name, "pad", self.pad, 0)
    if self.mode not in self.MODES:
      raise ValueError(
          f"{option_label(self.name, 'mode')} must be one of "
          f"{', '.join(self.MODES)}, got {self.mode!r}")

  def check_image(self, image_shape):
    if self.pad >= min(image_shape[:2]):
      raise ValueError(
          f"{option_label(self.name, 'pad')}={self.pad} must be smaller than "
          f"the image side {min(image_shape[:2])}")

  def __call__(self, key, images, labels):
    if self.pad == 0:
      return images, labels
    b, h, w, c = images.shape
    p = self.pad
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=self.mode)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * p + 1)

    def crop(image, offset):
      return lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets), labels


@register("flip")
@dataclasses.dataclass(frozen=True)
class Flip(Op):
  """Reverses the columns of each example with probability p."""
  p: float = 0.5

  def __post_init__(self):
    object.__setattr__(self, "p", check_prob(self.name, "p", self.p))

  def __call__(self, key, images, labels):
    flip = jax.random.bernoulli(key, self.p, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1],
                     images), labels


def rotate_image(image: Array, angle: Array) -> Array:
  """Rotates one HWC image counter-clockwise by `angle` radians.

  About the centre ((H-1)/2, (W-1)/2), bilinear, zero outside the image.
  Counter-clockwise matches np.rot90 and torchvision's rotate.
  """
  h, w, _ = image.shape
  cr, cc = (h - 1) / 2, (w - 1) / 2
  y = cr - jnp.arange(h, dtype=jnp.float32)[:, None]  # up
  x = jnp.arange(w, dtype=jnp.float32)[None, :] - cc  # right
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Each output pixel samples the input at its position rotated back.
  src_x = cos * x + sin * y
  src_y = -sin * x + cos * y
  coords = [cr - src_y, cc + src_x]
  sample = lambda plane: ndimage.map_coordinates(
      plane, coords, order=1, mode="constant", cval=0.0)
  return jnp.moveaxis(jax.vmap(sample)(jnp.moveaxis(image, -1, 0)), 0, -1)


@register("rotate")
@dataclasses.dataclass(frozen=True)
class Rotate(Op):
  """Rotates each example by an angle uniform in degrees (min, max).

  A single number d means (-d, d). Positive angles are counter-clockwise;
  bilinear interpolation, zero fill.
  """
  degrees: Any = 10.0

  def __post_init__(self):
    object.__setattr__(self, "degrees", check_range(
        self.name, "degrees", self.degrees, -360.0, 360.0, False,
        scalar_to=lambda d: (-d, d)))

  def __call__(self, key, images, labels):
    lo, hi = self.degrees
    angles = jax.random.uniform(key, (images.shape[0],), minval=lo,
                                maxval=hi)
    return jax.vmap(rotate_image)(images, jnp.deg2rad(angles)), labels
