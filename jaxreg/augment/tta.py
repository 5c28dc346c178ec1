"""Test-time views: eval logits averaged over mirrored and shifted images."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxreg import config as config_lib


def tta_logits(apply_fn: Callable, variables: dict, images: jax.Array,
               tta: str = "") -> jax.Array:
  """Eval-mode logits, averaged over test-time views as airbench does.

  "": the images only. "flip": 1/2 each for the images and their mirror.
  "flip_translate" (airbench's TTA level 2): 1/4 each for the images and
  their mirror, 1/8 each for the images shifted one pixel down-right and
  up-left (reflect padding) and the mirrors of those. Logits, not
  probabilities, are averaged. All views go through one batched call.
  """
  if tta not in config_lib.TTA_MODES:
    raise ValueError(f"config.train.tta={tta!r}; valid choices: "
                     f"{', '.join(map(repr, config_lib.TTA_MODES))}")
  if not tta:
    return apply_fn(variables, images, train=False)
  views = [images, images[:, :, ::-1]]
  weights = [0.5, 0.5]
  if tta == "flip_translate":
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    for shifted in (padded[:, :h, :w], padded[:, 2:, 2:]):
      views += [shifted, shifted[:, :, ::-1]]
    weights = [0.25, 0.25] + [0.125] * 4
  logits = apply_fn(variables, jnp.concatenate(views), train=False)
  logits = logits.reshape((len(views), images.shape[0]) + logits.shape[1:])
  return jnp.tensordot(jnp.asarray(weights, logits.dtype), logits, axes=1)
