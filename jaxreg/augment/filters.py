"""Filter ops: convolutions of each image with a random kernel (blur)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg.augment.base import Op, register
from jaxreg.augment.spec import (check_int, check_prob, check_range,
                                 option_label)


@register("blur")
@dataclasses.dataclass(frozen=True)
class Blur(Op):
  """Gaussian blur with sigma uniform in (min, max) per example, prob. p.

  torchvision GaussianBlur semantics: kernel exp(-x^2 / (2 sigma^2)) on
  x = -(k-1)/2 .. (k-1)/2, normalized to sum 1, applied separably on a
  reflect-padded image.
  """
  sigma: Any = (0.1, 2.0)
  kernel_size: int = 3
  p: float = 0.5

  def __post_init__(self):
    object.__setattr__(self, "sigma", check_range(
        self.name, "sigma", self.sigma, 0.0, math.inf, True,
        scalar_to=lambda s: (s, s)))
    check_int(self.name, "kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise ValueError(
          f"{option_label(self.name, 'kernel_size')} must be odd, got "
          f"{self.kernel_size}")
    object.__setattr__(self, "p", check_prob(self.name, "p", self.p))

  def check_image(self, image_shape):
    if self.kernel_size // 2 >= min(image_shape[:2]):
      raise ValueError(
          f"{option_label(self.name, 'kernel_size')}={self.kernel_size} is "
          f"too large for reflect padding of a "
          f"{image_shape[0]}x{image_shape[1]} image; use at most "
          f"{2 * min(image_shape[:2]) - 1}")

  def __call__(self, key, images, labels):
    b, h, w, _ = images.shape
    k_sigma, k_apply = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, (b, 1), minval=self.sigma[0],
                               maxval=self.sigma[1])
    k = self.kernel_size
    r = k // 2
    x = jnp.linspace(-(k - 1) / 2, (k - 1) / 2, k)[None, :]
    kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum(axis=1, keepdims=True)).astype(images.dtype)
    wt = lambda j: kernel[:, j, None, None, None]
    padded = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(wt(j) * padded[:, j:j + h] for j in range(k))
    out = sum(wt(j) * rows[:, :, j:j + w] for j in range(k))
    apply = jax.random.bernoulli(k_apply, self.p, (b,))
    return jnp.where(apply[:, None, None, None], out, images), labels
