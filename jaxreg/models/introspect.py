"""What a built model consists of, from shapes alone or one forward pass:
parameter counts, the paths of its layers and their outputs."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _as_batch_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 3:
    return (1,) + shape
  if len(shape) == 4:
    return shape
  raise ValueError(f"input_shape={shape}: give (H, W, C) or (B, H, W, C)")


def _abstract_init(model: nn.Module, input_shape: Sequence[int], **kwargs):
  x = jax.ShapeDtypeStruct(_as_batch_shape(input_shape), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, **kwargs), x)


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of trainable parameters (the `params` collection), from shapes
  only: no compile and no allocation. `input_shape` is (H, W, C)."""
  params = _abstract_init(model, input_shape)["params"]
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def feature_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
  """Paths ("stage1_block1/norm2") of every submodule, in the order their
  outputs are computed (a block after its layers); any of them can be
  passed to `capture_features`. Traces shapes only."""
  order: list[str] = []

  def record(module: nn.Module, method_name: str) -> bool:
    path = "/".join(module.path)
    if method_name == "__call__" and path and path not in order:
      order.append(path)
    return False  # Record the path only; store nothing.

  _abstract_init(model, input_shape, capture_intermediates=record)
  return order


def capture_features(model: nn.Module, variables: Any, x: Array,
                     layer: str) -> Array:
  """Output of submodule `layer` (a path from `feature_layers`) on `x` in
  eval mode (running statistics, no dropout). Model code is untouched:
  flax's capture_intermediates records only the module whose path matches.
  A module called more than once returns its first output."""

  def only_layer(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and "/".join(module.path) == layer

  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  _, state = model.apply(variables, x, train=False,
                         capture_intermediates=only_layer,
                         mutable=["intermediates"])
  node = state.get("intermediates", {})
  for part in layer.split("/") if layer else ():
    node = node.get(part, {}) if isinstance(node, dict) else {}
  if not layer or "__call__" not in node:
    choices = feature_layers(model, x.shape)
    raise ValueError(f"unknown feature layer {layer!r}; valid choices: "
                     f"{', '.join(choices)}")
  return node["__call__"][0]
