"""Data augmentation inside the jitted train step, from a PRNG key.

The pipeline is one string, `config.augment`: ops separated by "|", each op
either `name` or `name(key=value, ...)` with Python literal values, e.g.
"pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)". "" means none.

Contract:
  * `make_augment(spec, image_shape, num_classes)` parses the spec, resolves
    every op from the `AUGMENTS` registry and validates every option once,
    before anything is traced, and returns `fn(key, images, labels) ->
    (images, labels)`. Images are float32 [B, H, W, C] in [0, 1] (this runs
    before standardization); labels are float32 one-hot or soft [B, K].
  * Op number i draws from `jax.random.fold_in(key, i)`, so the output is a
    pure function of the key and an edit to one op does not reshuffle the
    randomness of the others. Every random choice is per example unless the
    op says otherwise (mixup draws one lambda per batch, as in the paper).
  * Shapes are static. Only `cutout_extra` changes the batch size (it
    appends n examples); `output_batch_size` says by how much, so the
    caller can size buffers at build time.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import ndimage

from jaxreg.registry import Registry, check_kwargs

Array = jax.Array
AugmentFn = Callable[[Array, Array, Array], tuple[Array, Array]]

AUGMENTS: Registry[type] = Registry("augmentation")


# ----------------------------------------------------------------------------
# Spec parsing.


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


# ----------------------------------------------------------------------------
# Option validation. Each returns the normalized value or raises ValueError
# naming the op and the option.


def _where(op: str, name: str) -> str:
  return f"augment {op!r} option {name!r}"


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(op, name, v, lo: int) -> int:
  if not isinstance(v, int) or isinstance(v, bool):
    raise ValueError(f"{_where(op, name)} must be an integer, got {v!r}")
  if v < lo:
    raise ValueError(f"{_where(op, name)} must be >= {lo}, got {v}")
  return v


def _prob(op, name, v) -> float:
  if not _is_number(v) or not 0.0 <= v <= 1.0:
    raise ValueError(
        f"{_where(op, name)} is a probability and must lie in [0, 1], "
        f"got {v!r}")
  return float(v)


def _range(op, name, v, lo: float, hi: float, lo_open: bool,
           scalar_to: Callable[[float], tuple[float, float]] | None = None
           ) -> tuple[float, float]:
  """A (min, max) pair inside [lo, hi] (lo excluded when lo_open)."""
  if _is_number(v) and scalar_to is not None:
    v = scalar_to(float(v))
  if (not isinstance(v, (tuple, list)) or len(v) != 2
      or not all(_is_number(x) for x in v)):
    raise ValueError(
        f"{_where(op, name)} must be a (min, max) pair of numbers"
        f"{' or one number' if scalar_to else ''}, got {v!r}")
  a, b = float(v[0]), float(v[1])
  low_ok = a > lo if lo_open else a >= lo
  if not (low_ok and a <= b <= hi):
    bracket = "(" if lo_open else "["
    raise ValueError(
        f"{_where(op, name)} must satisfy min <= max within "
        f"{bracket}{lo}, {hi}], got {v!r}")
  return a, b


def _check_image_shape(image_shape) -> tuple[int, int, int]:
  if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                 and d > 0 for d in image_shape)):
    raise ValueError(
        f"image_shape must be (height, width, channels) of positive ints, "
        f"got {image_shape!r}")
  return tuple(int(d) for d in image_shape)


# ----------------------------------------------------------------------------
# Ops. Each is a frozen dataclass whose fields are exactly its options:
# __post_init__ checks what needs no image, `check_image` what does, and
# __call__ transforms a batch.


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


def _box_mask(top: Array, left: Array, height, width, hw: tuple[int, int]
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


def _cutout(key: Array, images: Array, size: int) -> tuple[Array, Array]:
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
  mask = _box_mask(cy - size // 2, cx - size // 2, size, size, (h, w))
  return jnp.where(mask[..., None], jnp.zeros((), images.dtype), images), mask


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
    _int(self.name, "pad", self.pad, 0)
    if self.mode not in self.MODES:
      raise ValueError(
          f"{_where(self.name, 'mode')} must be one of "
          f"{', '.join(self.MODES)}, got {self.mode!r}")

  def check_image(self, image_shape):
    if self.pad >= min(image_shape[:2]):
      raise ValueError(
          f"{_where(self.name, 'pad')}={self.pad} must be smaller than the "
          f"image side {min(image_shape[:2])}")

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
    object.__setattr__(self, "p", _prob(self.name, "p", self.p))

  def __call__(self, key, images, labels):
    flip = jax.random.bernoulli(key, self.p, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1],
                     images), labels


@register("cutout")
@dataclasses.dataclass(frozen=True)
class Cutout(Op):
  """Cutout (DeVries & Taylor 2017) applied to each example with prob. p."""
  size: int = 8
  p: float = 1.0

  def __post_init__(self):
    _int(self.name, "size", self.size, 1)
    object.__setattr__(self, "p", _prob(self.name, "p", self.p))

  def check_image(self, image_shape):
    if self.size > min(image_shape[:2]):
      raise ValueError(
          f"{_where(self.name, 'size')}={self.size} is larger than the "
          f"image ({image_shape[0]}x{image_shape[1]})")

  def __call__(self, key, images, labels):
    k_cut, k_apply = jax.random.split(key)
    cut, _ = _cutout(k_cut, images, self.size)
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
    _int(self.name, "n", self.n, 1)
    _int(self.name, "size", self.size, 1)

  def check_image(self, image_shape):
    Cutout.check_image(self, image_shape)

  def batch_growth(self):
    return self.n

  def __call__(self, key, images, labels):
    b = images.shape[0]
    if self.n > b:
      raise ValueError(
          f"{_where(self.name, 'n')}={self.n} exceeds the batch size {b}")
    k_pick, k_cut = jax.random.split(key)
    picked = jax.random.choice(k_pick, b, (self.n,), replace=False)
    extra, _ = _cutout(k_cut, images[picked], self.size)
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
    object.__setattr__(self, "p", _prob(self.name, "p", self.p))
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("scale", _range(self.name, "scale", self.scale, 0.0, 1.0, True))
    set_("ratio", _range(self.name, "ratio", self.ratio, 0.0, math.inf,
                         True))
    v = self.value
    if isinstance(v, (tuple, list)) and v and all(_is_number(x) for x in v):
      set_("value", tuple(float(x) for x in v))
    elif _is_number(v):
      set_("value", float(v))
    else:
      raise ValueError(
          f"{_where(self.name, 'value')} must be a number or one number per "
          f"channel, got {v!r}")

  def check_image(self, image_shape):
    if isinstance(self.value, tuple) and len(self.value) != image_shape[2]:
      raise ValueError(
          f"{_where(self.name, 'value')} has {len(self.value)} entries but "
          f"the images have {image_shape[2]} channels")

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
    mask = apply[:, None, None] & _box_mask(top, left, eh, ew, (h, w))
    value = jnp.asarray(self.value, images.dtype)
    return jnp.where(mask[..., None], value, images), labels


@register("mixup")
@dataclasses.dataclass(frozen=True)
class Mixup(Op):
  """Mixup (Zhang et al. 2018): one lambda ~ Beta(alpha, alpha) per batch.

  Each example is mixed with a partner from a random permutation of the
  batch; images and labels take the same convex combination.
  """
  alpha: float = 0.2

  def __post_init__(self):
    if not _is_number(self.alpha) or not self.alpha > 0:
      raise ValueError(
          f"{_where(self.name, 'alpha')} must be a number > 0 (the Beta "
          f"distribution's parameter), got {self.alpha!r}")
    object.__setattr__(self, "alpha", float(self.alpha))

  def __call__(self, key, images, labels):
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, self.alpha, self.alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mix = lambda x: (lam.astype(x.dtype) * x
                     + (1 - lam).astype(x.dtype) * x[perm])
    return mix(images), mix(labels)


def _rotate(image: Array, angle: Array) -> Array:
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
    object.__setattr__(self, "degrees", _range(
        self.name, "degrees", self.degrees, -360.0, 360.0, False,
        scalar_to=lambda d: (-d, d)))

  def __call__(self, key, images, labels):
    lo, hi = self.degrees
    angles = jax.random.uniform(key, (images.shape[0],), minval=lo,
                                maxval=hi)
    return jax.vmap(_rotate)(images, jnp.deg2rad(angles)), labels


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
    object.__setattr__(self, "sigma", _range(
        self.name, "sigma", self.sigma, 0.0, math.inf, True,
        scalar_to=lambda s: (s, s)))
    _int(self.name, "kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise ValueError(
          f"{_where(self.name, 'kernel_size')} must be odd, got "
          f"{self.kernel_size}")
    object.__setattr__(self, "p", _prob(self.name, "p", self.p))

  def check_image(self, image_shape):
    if self.kernel_size // 2 >= min(image_shape[:2]):
      raise ValueError(
          f"{_where(self.name, 'kernel_size')}={self.kernel_size} is too "
          f"large for reflect padding of a {image_shape[0]}x{image_shape[1]} "
          f"image; use at most {2 * min(image_shape[:2]) - 1}")

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


# ----------------------------------------------------------------------------
# Pipeline.


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
    spec: the pipeline string (see the module docstring); "" for none.
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
  image_shape = _check_image_shape(image_shape)
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
