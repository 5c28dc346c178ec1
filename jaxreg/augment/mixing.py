"""Mixing ops: examples blended with other members of the batch (mixup)."""
from __future__ import annotations

import dataclasses

import jax

from jaxreg.augment.base import Op, register
from jaxreg.augment.spec import is_number, option_label


@register("mixup")
@dataclasses.dataclass(frozen=True)
class Mixup(Op):
  """Mixup (Zhang et al. 2018): one lambda ~ Beta(alpha, alpha) per batch.

  Each example is mixed with a partner from a random permutation of the
  batch; images and labels take the same convex combination.
  """
  alpha: float = 0.2

  def __post_init__(self):
    if not is_number(self.alpha) or not self.alpha > 0:
      raise ValueError(
          f"{option_label(self.name, 'alpha')} must be a number > 0 (the "
          f"Beta distribution's parameter), got {self.alpha!r}")
    object.__setattr__(self, "alpha", float(self.alpha))

  def __call__(self, key, images, labels):
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, self.alpha, self.alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mix = lambda x: (lam.astype(x.dtype) * x
                     + (1 - lam).astype(x.dtype) * x[perm])
    return mix(images), mix(labels)
