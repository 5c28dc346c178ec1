"""The op interface and the registry that names the ops.

Each op is a frozen dataclass whose fields are exactly its options:
__post_init__ checks what needs no image, `check_image` what does, and
__call__ transforms a batch. `@register(name)` files a class in `AUGMENTS`
under the name a spec uses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax

from jaxreg.registry import Registry

Array = jax.Array
AugmentFn = Callable[[Array, Array, Array], tuple[Array, Array]]

AUGMENTS: Registry[type] = Registry("augmentation")


@dataclasses.dataclass(frozen=True)
class Op:
  """Base class of augmentation ops."""
  name: ClassVar[str] = ""

  def check_image(self, image_shape: tuple[int, int, int]) -> None:
    """Refuses options that do not fit images of this shape."""
    del image_shape

  def batch_growth(self) -> int:
    """How many examples the op appends to the batch."""
    return 0

  def __call__(self, key: Array, images: Array,
               labels: Array) -> tuple[Array, Array]:
    raise NotImplementedError


def register(name: str):
  def deco(cls):
    cls.name = name
    AUGMENTS.add(name, cls)
    return cls
  return deco
