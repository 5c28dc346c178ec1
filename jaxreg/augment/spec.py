"""Pipeline specs: the parser and the option checks every op shares.

`parse` turns the `config.augment` string into `[(op name, {option:
value}), ...]`; the `check_*` helpers validate one option each and return its
normalized value, or raise ValueError naming the op and the option (see
`option_label`), so every op words its errors the same way.
"""
from __future__ import annotations

import ast
import numbers
from typing import Callable


def parse(spec: str) -> list[tuple[str, dict]]:
  """Parses a pipeline spec into `[(op name, {option: value}), ...]`.

  Only the syntax is checked here; names and options are checked by
  `make_augment`. The spec is read as one Python expression in which "|" is
  the bitwise-or operator, so "|" inside a quoted string value is harmless.

  Args:
    spec: e.g. "pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)"; "" or
      whitespace for no augmentation.

  Returns:
    The ops in order, each with its keyword options as Python values.

  Raises:
    ValueError: the spec is not of that form.
  """
  if not isinstance(spec, str):
    raise ValueError(f"augment spec must be a string, got {spec!r}")
  if not spec.strip():
    return []
  form = ("expected ops separated by '|', each 'name' or "
          "'name(key=value, ...)' with Python literal values, e.g. "
          "\"pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)\"")
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse augment spec {spec!r}: {form}") from e

  nodes = []

  def flatten(node):
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
      flatten(node.left)
      flatten(node.right)
    else:
      nodes.append(node)

  flatten(tree)
  ops = []
  for node in nodes:
    text = ast.get_source_segment(spec.strip(), node) or ast.dump(node)
    if isinstance(node, ast.Name):
      ops.append((node.id, {}))
      continue
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      raise ValueError(f"bad augment op {text!r} in {spec!r}: {form}")
    if node.args:
      raise ValueError(
          f"augment op {text!r} has positional arguments; name every option, "
          f"e.g. cutout(size=8)")
    kwargs = {}
    for kw in node.keywords:
      if kw.arg is None:
        raise ValueError(f"augment op {text!r}: '**' is not allowed; {form}")
      try:
        kwargs[kw.arg] = ast.literal_eval(kw.value)
      except ValueError as e:
        raise ValueError(
            f"augment op {text!r}: option {kw.arg!r} must be a Python literal "
            f"(number, string, tuple), got "
            f"{ast.get_source_segment(spec.strip(), kw.value)!r}") from e
    ops.append((node.func.id, kwargs))
  return ops


def option_label(op: str, name: str) -> str:
  """How an error names an option: "augment 'op' option 'name'"."""
  return f"augment {op!r} option {name!r}"


def is_number(v) -> bool:
  """A real number, not a bool (True would otherwise pass as 1)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(op: str, name: str, v, lo: int) -> int:
  """An integer (not a bool) >= lo."""
  if not isinstance(v, int) or isinstance(v, bool):
    raise ValueError(f"{option_label(op, name)} must be an integer, got {v!r}")
  if v < lo:
    raise ValueError(f"{option_label(op, name)} must be >= {lo}, got {v}")
  return v


def check_prob(op: str, name: str, v) -> float:
  """A probability in [0, 1], as a float."""
  if not is_number(v) or not 0.0 <= v <= 1.0:
    raise ValueError(
        f"{option_label(op, name)} is a probability and must lie in [0, 1], "
        f"got {v!r}")
  return float(v)


def check_range(op: str, name: str, v, lo: float, hi: float, lo_open: bool,
                scalar_to: Callable[[float], tuple[float, float]] | None = None
                ) -> tuple[float, float]:
  """A (min, max) pair inside [lo, hi] (lo excluded when lo_open).

  With `scalar_to`, one number is also accepted and mapped to a pair.
  """
  if is_number(v) and scalar_to is not None:
    v = scalar_to(float(v))
  if (not isinstance(v, (tuple, list)) or len(v) != 2
      or not all(is_number(x) for x in v)):
    raise ValueError(
        f"{option_label(op, name)} must be a (min, max) pair of numbers"
        f"{' or one number' if scalar_to else ''}, got {v!r}")
  a, b = float(v[0]), float(v[1])
  low_ok = a > lo if lo_open else a >= lo
  if not (low_ok and a <= b <= hi):
    bracket = "(" if lo_open else "["
    raise ValueError(
        f"{option_label(op, name)} must satisfy min <= max within "
        f"{bracket}{lo}, {hi}], got {v!r}")
  return a, b


def check_image_shape(image_shape) -> tuple[int, int, int]:
  """(height, width, channels) of positive ints, as a tuple."""
  if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                 and d > 0 for d in image_shape)):
    raise ValueError(
        f"image_shape must be (height, width, channels) of positive ints, "
        f"got {image_shape!r}")
  return tuple(int(d) for d in image_shape)
