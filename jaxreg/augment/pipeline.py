"""The pipeline: a spec resolved into ops once, then one function of a key.

Every op and option is checked when the pipeline is built, before anything
is traced. Op number i draws from `jax.random.fold_in(key, i)`.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

# The op modules register their ops on import; the pipeline looks them up.
from jaxreg.augment import filters, geometric, mixing  # noqa: F401
from jaxreg.augment.base import AUGMENTS, Array, AugmentFn, Op
from jaxreg.augment.erasing import CutoutExtra
from jaxreg.augment.spec import check_image_shape, parse
from jaxreg.registry import check_kwargs


def _build_ops(spec: str) -> list[Op]:
  ops = []
  for name, kwargs in parse(spec):
    cls = AUGMENTS.get(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    check_kwargs("augmentation", name, kwargs, fields)
    ops.append(cls(**kwargs))
  return ops


def output_batch_size(spec: str, batch_size: int) -> int:
  """The batch size after the pipeline (cutout_extra appends examples).

  Raises:
    ValueError: the spec is invalid, or an op appends copies of more
      distinct examples than the batch holds at that point.
  """
  size = batch_size
  for op in _build_ops(spec):
    if isinstance(op, CutoutExtra) and op.n > size:
      raise ValueError(
          f"augment 'cutout_extra' option 'n'={op.n} exceeds the batch size "
          f"{size}")
    size += op.batch_growth()
  return size


def make_augment(spec: str, image_shape: tuple[int, int, int],
                 num_classes: int) -> AugmentFn:
  """Builds the augmentation function for a pipeline spec.

  Every op and option is validated here, before any tracing.

  Args:
    spec: the pipeline string (see `jaxreg.augment`); "" for none.
    image_shape: (H, W, C) of the images the function will receive.
    num_classes: K, the width of the label vectors.

  Returns:
    `fn(key, images, labels) -> (images, labels)` with images float32
    [B, H, W, C] in [0, 1] and labels float32 [B, K]; pure in the key and
    safe under jax.jit.

  Raises:
    ValueError: bad syntax, unknown op or option, or an option value out of
      range or not fitting the image shape.
  """
  image_shape = check_image_shape(image_shape)
  if (not isinstance(num_classes, numbers.Integral)
      or isinstance(num_classes, bool) or num_classes < 1):
    raise ValueError(f"num_classes must be a positive int, got "
                     f"{num_classes!r}")
  num_classes = int(num_classes)
  ops = _build_ops(spec)
  for op in ops:
    op.check_image(image_shape)

  def augment(key: Array, images: Array,
              labels: Array) -> tuple[Array, Array]:
    if images.ndim != 4 or tuple(images.shape[1:]) != image_shape:
      dims = ", ".join(map(str, image_shape))
      raise ValueError(f"augment expects images [B, {dims}], got "
                       f"{images.shape}")
    if labels.shape != (images.shape[0], num_classes):
      raise ValueError(f"augment expects labels [{images.shape[0]}, "
                       f"{num_classes}], got {labels.shape}")
    if not (jnp.issubdtype(images.dtype, jnp.floating)
            and jnp.issubdtype(labels.dtype, jnp.floating)):
      raise ValueError(
          f"augment expects float images and labels (one-hot), got "
          f"{images.dtype} and {labels.dtype}")
    for i, op in enumerate(ops):
      images, labels = op(jax.random.fold_in(key, i), images, labels)
    return images, labels

  return augment


def available() -> list[str]:
  """Names of the registered ops."""
  return AUGMENTS.names()
