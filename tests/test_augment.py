"""Tests for jaxreg.augment: every op's output is checked against NumPy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import augment
from jaxreg import config


def _run(spec, images, labels=None, key=0, num_classes=None, jit=True):
  images = np.asarray(images, np.float32)
  if labels is None:
    k = num_classes or 3
    labels = np.eye(k, dtype=np.float32)[np.arange(len(images)) % k]
  fn = augment.make_augment(spec, images.shape[1:], labels.shape[1])
  if jit:  # one compile is much cheaper than many eager dispatches
    fn = jax.jit(fn)
  out_x, out_y = fn(jax.random.key(key), jnp.asarray(images),
                    jnp.asarray(labels, jnp.float32))
  return np.asarray(out_x, np.float64), np.asarray(out_y, np.float64)


def _random_images(shape, seed=0, low=0.0):
  return np.random.default_rng(seed).uniform(low, 1.0, shape).astype(
      np.float32)


def _box_ref(cy, cx, size, h, w):
  """DeVries & Taylor's clipped square, in float64 NumPy."""
  y1, x1 = cy - size // 2, cx - size // 2
  m = np.zeros((h, w), bool)
  m[max(y1, 0):max(y1 + size, 0), max(x1, 0):max(x1 + size, 0)] = True
  return m


def _match_cutout(zero_mask, size):
  """Centres whose clipped square equals `zero_mask` ([H, W] bool)."""
  h, w = zero_mask.shape
  return [(cy, cx) for cy in range(h) for cx in range(w)
          if np.array_equal(_box_ref(cy, cx, size, h, w), zero_mask)]


def _bbox(mask):
  rows, cols = np.nonzero(mask)
  return rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1


# ---------------------------------------------------------------------------
# Parsing.


def test_parse():
  assert augment.parse("") == []
  assert augment.parse("   ") == []
  assert augment.parse("pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)") == [
      ("pad_crop", {"pad": 4, "mode": "reflect"}), ("flip", {}),
      ("cutout", {"size": 8})]
  assert augment.parse(
      " random_erasing(scale=(0.1, 0.2), value=-1.0) | mixup() ") == [
          ("random_erasing", {"scale": (0.1, 0.2), "value": -1.0}),
          ("mixup", {})]
  # "|" inside a string value is not a separator.
  assert augment.parse("pad_crop(mode='a|b')") == [
      ("pad_crop", {"mode": "a|b"})]


@pytest.mark.parametrize("spec", [
    "flip(", "flip|", "|flip", "flip||cutout", "flip(0.5)", "flip(p=x)",
    "flip(p=1+1j*q)", "flip(**d)", "3", "flip.x", "flip(p=0.5)(q=1)",
    "flip(p=(a|b))"])
def test_parse_errors(spec):
  with pytest.raises(ValueError):
    augment.parse(spec)


# ---------------------------------------------------------------------------
# pad_crop.


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge", "symmetric"])
def test_pad_crop_is_shifted_window_of_padded_image(mode):
  h, w, c, pad, b = 6, 5, 2, 2, 64
  # Every pixel and channel holds a distinct value, so a window of the
  # padded image identifies its offset.
  img = ((np.arange(h * w * c) + 1) / (h * w * c + 1)).reshape(h, w, c)
  img = img.astype(np.float32)
  out, _ = _run(f"pad_crop(pad={pad},mode={mode!r})",
                np.broadcast_to(img, (b, h, w, c)))
  padded = np.pad(img.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)),
                  mode=mode)
  offsets = []
  for example in out:
    found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
             if np.array_equal(example, padded[dy:dy + h, dx:dx + w])]
    assert len(found) == 1, found
    offsets.append(found[0])
  dys, dxs = zip(*offsets)
  # Offsets are per example and reach both extremes of the range.
  assert set(dys) == set(range(2 * pad + 1))
  assert set(dxs) == set(range(2 * pad + 1))


def test_pad_zero_is_identity():
  x = _random_images((4, 5, 5, 1))
  out, _ = _run("pad_crop(pad=0)", x)
  np.testing.assert_array_equal(out, x)


# ---------------------------------------------------------------------------
# flip.


def test_flip_reverses_columns_of_flipped_examples_only():
  x = _random_images((32, 4, 5, 2))
  out, y = _run("flip", x)
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)]
  kept = [np.array_equal(o, xi) for o, xi in zip(out, x)]
  assert all(f != k for f, k in zip(flipped, kept))  # exactly one of the two
  assert 4 <= sum(flipped) <= 28
  np.testing.assert_array_equal(y, np.eye(3)[np.arange(32) % 3])
  out0, _ = _run("flip(p=0.0)", x)
  np.testing.assert_array_equal(out0, x)
  out1, _ = _run("flip(p=1)", x)
  np.testing.assert_array_equal(out1, x[:, :, ::-1])


# ---------------------------------------------------------------------------
# cutout and cutout_extra.


@pytest.mark.parametrize("size", [4, 3])
def test_cutout_zeroes_a_clipped_square(size):
  h, w, b = 10, 9, 128
  out, _ = _run(f"cutout(size={size})", np.ones((b, h, w, 2)))
  assert set(np.unique(out)) <= {0.0, 1.0}
  areas, clipped = [], 0
  for example in out:
    zero = example[..., 0] == 0
    np.testing.assert_array_equal(zero, example[..., 1] == 0)
    centres = _match_cutout(zero, size)
    assert centres, "zeroed region is not a clipped square"
    cy, cx = centres[0]
    assert zero.sum() == _box_ref(cy, cx, size, h, w).sum()
    areas.append(zero.sum())
    clipped += zero.sum() < size * size
  assert 0 < clipped < b
  assert max(areas) == size * size
  # Centre uniform over pixels: mean area = mean row extent * mean col extent.
  ext = lambda n: np.mean([_box_ref(i, 0, size, n, 1).sum() for i in range(n)])
  assert abs(np.mean(areas) - ext(h) * ext(w)) < 1.0


def test_cutout_probability():
  x = np.ones((64, 8, 8, 1))
  out, _ = _run("cutout(size=4,p=0.5)", x)
  cut = (out == 0).any(axis=(1, 2, 3))
  assert 10 < cut.sum() < 54
  np.testing.assert_array_equal(out[~cut], x[~cut])
  out0, _ = _run("cutout(size=4,p=0)", x)
  np.testing.assert_array_equal(out0, x)


def test_cutout_extra_appends_cutout_copies_with_labels():
  b, n, size = 6, 3, 4
  x = _random_images((b, 8, 8, 1), low=0.2)  # no natural zeros
  y = np.eye(b, dtype=np.float32)
  assert augment.output_batch_size(f"cutout_extra(n={n},size={size})", b) == 9
  out, out_y = _run(f"cutout_extra(n={n},size={size})", x, y)
  assert out.shape == (b + n, 8, 8, 1) and out_y.shape == (b + n, b)
  np.testing.assert_array_equal(out[:b], x)
  np.testing.assert_array_equal(out_y[:b], y)
  sources = []
  for extra, label in zip(out[b:], out_y[b:]):
    i = int(np.argmax(label))
    np.testing.assert_array_equal(label, y[i])
    zero = extra[..., 0] == 0
    assert _match_cutout(zero, size)
    np.testing.assert_array_equal(extra[~zero], x[i][~zero])
    sources.append(i)
  assert len(set(sources)) == n  # distinct batch members


# ---------------------------------------------------------------------------
# random_erasing.


def _erased_boxes(out, value):
  boxes = []
  for example in out:
    mask = np.all(example == value, axis=-1)
    if not mask.any():
      boxes.append(None)
      continue
    top, left, bh, bw = _bbox(mask)
    assert mask.sum() == bh * bw, "erased region is not a rectangle"
    boxes.append((top, left, bh, bw))
  return boxes


def test_random_erasing_area_and_aspect_in_range():
  h = w = 32
  b, scale, ratio = 256, (0.1, 0.2), (0.5, 2.0)
  x = np.ones((b, h, w, 1))
  out, _ = _run(f"random_erasing(p=1.0,scale={scale},ratio={ratio},"
                f"value=0.25)", x)
  assert set(np.unique(out)) == {0.25, 1.0}
  boxes = _erased_boxes(out, 0.25)
  assert all(box is not None for box in boxes)
  fractions = []
  for _, _, bh, bw in boxes:
    assert bh < h and bw < w
    # h and w are rounded from sqrt(area * r) and sqrt(area / r).
    assert (bh - .5) * (bw - .5) <= scale[1] * h * w
    assert (bh + .5) * (bw + .5) >= scale[0] * h * w
    assert (bh - .5) / (bw + .5) <= ratio[1]
    assert (bh + .5) / (bw - .5) >= ratio[0]
    fractions.append(bh * bw / (h * w))
  # Area fraction uniform in scale: mean near the midpoint.
  assert abs(np.mean(fractions) - np.mean(scale)) < 0.01
  tops = [box[0] for box in boxes]
  assert min(tops) == 0 or len(set(tops)) > 10


def test_random_erasing_defaults_value_per_channel_and_probability():
  h = w = 16
  x = np.ones((128, h, w, 3))
  out, _ = _run("random_erasing(p=0.5,value=(0.1,0.2,0.3))", x)
  boxes = _erased_boxes(out, np.float32([0.1, 0.2, 0.3]))
  erased = [box is not None for box in boxes]
  assert 34 < sum(erased) < 94
  for example, box in zip(out, boxes):
    if box is None:
      np.testing.assert_array_equal(example, 1.0)
      continue
    top, left, bh, bw = box
    assert (bh - .5) * (bw - .5) <= 0.33 * h * w
    assert (bh + .5) * (bw + .5) >= 0.02 * h * w
    assert 0.3 <= (bh + .5) / (bw - .5) and (bh - .5) / (bw + .5) <= 3.3
    rest = np.ones((h, w), bool)
    rest[top:top + bh, left:left + bw] = False
    np.testing.assert_array_equal(example[rest], 1.0)


def test_random_erasing_leaves_image_when_no_try_fits():
  # An erased box must be strictly smaller than the image (torchvision);
  # area fraction 1 with aspect 1 never fits, so nothing is erased.
  x = _random_images((8, 6, 6, 1))
  out, _ = _run("random_erasing(p=1,scale=(1.0,1.0),ratio=(1.0,1.0))", x)
  np.testing.assert_array_equal(out, x)


# ---------------------------------------------------------------------------
# mixup.


def test_mixup_images_and_labels_same_convex_combination():
  b = 8
  x = _random_images((b, 4, 4, 2))
  y = np.eye(b, dtype=np.float32)
  out, out_y = _run("mixup(alpha=0.4)", x, y, key=3)
  np.testing.assert_allclose(out_y.sum(axis=1), 1.0, atol=1e-6)
  lams, partners = [], []
  for i in range(b):
    if out_y[i, i] > 1 - 1e-6:  # mixed with itself
      partners.append(i)
      np.testing.assert_allclose(out[i], x[i], atol=1e-6)
      continue
    lam = out_y[i, i]
    others = out_y[i].copy()
    others[i] = 0
    j = int(np.argmax(others))
    np.testing.assert_allclose(others[j], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(
        out[i], lam * x[i].astype(np.float64) + (1 - lam) * x[j], atol=1e-6)
    lams.append(lam)
    partners.append(j)
  assert len(lams) >= 2
  assert 1e-3 < lams[0] < 1 - 1e-3
  np.testing.assert_allclose(lams, lams[0], atol=1e-6)  # one lambda per batch
  assert sorted(partners) == list(range(b))  # partners are a permutation


def test_mixup_lambda_is_beta_distributed():
  alpha, b = 0.2, 16
  fn = augment.make_augment(f"mixup(alpha={alpha})", (1, 1, 1), b)
  x = jnp.zeros((b, 1, 1, 1))
  y = jnp.eye(b)
  keys = jax.random.split(jax.random.key(0), 2000)
  labels = jax.jit(jax.vmap(lambda k: fn(k, x, y)[1]))(keys)
  # Rows not mixed with themselves hold lambda on the diagonal.
  lam = np.asarray(jnp.min(jnp.diagonal(labels, axis1=1, axis2=2), axis=1))
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 2000 draws give a
  # standard error near 0.01 for the mean and 0.002 for the variance.
  assert abs(lam.mean() - 0.5) < 0.04, lam.mean()
  assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01, lam.var()


# ---------------------------------------------------------------------------
# rotate.


def _rotate_ref(img, degrees):
  """Bilinear counter-clockwise rotation about the centre, zero fill."""
  img = img.astype(np.float64)
  h, w, _ = img.shape
  t = math.radians(degrees)
  cr, cc = (h - 1) / 2, (w - 1) / 2
  out = np.zeros_like(img)
  for r in range(h):
    for c in range(w):
      x, y = c - cc, cr - r
      sx = math.cos(t) * x + math.sin(t) * y
      sy = -math.sin(t) * x + math.cos(t) * y
      rr, cs = cr - sy, cc + sx
      r0, c0 = math.floor(rr), math.floor(cs)
      for dr in (0, 1):
        for dc in (0, 1):
          ri, ci = r0 + dr, c0 + dc
          wt = (1 - abs(rr - ri)) * (1 - abs(cs - ci))
          if 0 <= ri < h and 0 <= ci < w:
            out[r, c] += wt * img[ri, ci]
  return out


def test_rotate_fixed_angles():
  x = _random_images((2, 7, 7, 2))
  out, _ = _run("rotate(degrees=0)", x)
  np.testing.assert_allclose(out, x, atol=1e-6)
  out, _ = _run("rotate(degrees=(90,90))", x)
  np.testing.assert_allclose(out, np.rot90(x, k=1, axes=(1, 2)), atol=1e-5)
  out, _ = _run("rotate(degrees=(-90,-90))", x)
  np.testing.assert_allclose(out, np.rot90(x, k=-1, axes=(1, 2)), atol=1e-5)
  x = _random_images((2, 6, 9, 1))
  out, _ = _run("rotate(degrees=(30,30))", x)
  for o, xi in zip(out, x):
    np.testing.assert_allclose(o, _rotate_ref(xi, 30), atol=1e-5)


def test_rotate_random_angles_in_range():
  # Bilinear interpolation of a linear ramp is exact, so inside the
  # inscribed circle the output is a ramp whose gradient gives the angle.
  n, b, deg = 9, 32, 20.0
  cr = (n - 1) / 2
  r, c = np.mgrid[:n, :n]
  x, y = c - cr, cr - r
  ramp = (0.5 + 0.03 * x + 0.04 * y)[..., None]
  out, _ = _run(f"rotate(degrees={deg})", np.broadcast_to(ramp, (b, n, n, 1)))
  inside = x ** 2 + y ** 2 <= cr ** 2
  design = np.stack([x[inside], y[inside], np.ones(inside.sum())], axis=1)
  angles = []
  for o in out:
    (gx, gy, g0), res, *_ = np.linalg.lstsq(design, o[..., 0][inside],
                                             rcond=None)
    assert res[0] < 1e-9 and abs(g0 - 0.5) < 1e-5
    np.testing.assert_allclose(np.hypot(gx, gy), 0.05, rtol=1e-4)
    angles.append(math.degrees(math.atan2(gy, gx) - math.atan2(0.04, 0.03)))
  angles = np.array(angles)
  assert np.all(np.abs(angles) <= deg + 1e-3)
  assert angles.min() < -deg / 2 and angles.max() > deg / 2


# ---------------------------------------------------------------------------
# blur.


def _gauss(sigma, k):
  x = np.arange(k) - (k - 1) / 2
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return g / g.sum()


def test_blur_constant_stays_constant():
  out, _ = _run("blur(p=1.0,kernel_size=5)", np.full((8, 6, 6, 3), 0.7))
  np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_blur_impulse_matches_gaussian_kernel():
  n, k, b = 9, 5, 16
  x = np.zeros((b, n, n, 1))
  x[:, n // 2, n // 2] = 1
  out, _ = _run(f"blur(sigma=(0.5,2.0),kernel_size={k},p=1)", x)
  sigmas = []
  for o in out[..., 0]:
    mid = n // 2
    ratio = o[mid, mid + 1] / o[mid, mid]  # = exp(-1 / (2 sigma^2))
    sigma = math.sqrt(-0.5 / math.log(ratio))
    g = _gauss(sigma, k)
    ref = np.zeros((n, n))
    ref[mid - k // 2:mid + k // 2 + 1, mid - k // 2:mid + k // 2 + 1] = (
        np.outer(g, g))
    np.testing.assert_allclose(o, ref, atol=1e-6)
    sigmas.append(sigma)
  assert 0.5 - 1e-3 <= min(sigmas) < 0.9 and 1.6 < max(sigmas) <= 2.0 + 1e-3


def test_blur_fixed_sigma_matches_reflect_padded_reference():
  k, sigma = 5, 1.3
  x = _random_images((4, 6, 7, 2))
  out, _ = _run(f"blur(sigma={sigma},kernel_size={k},p=1.0)", x)
  g = _gauss(sigma, k)
  r = k // 2
  padded = np.pad(x.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)),
                  mode="reflect")
  ref = sum(g[i] * g[j] * padded[:, i:i + 6, j:j + 7]
            for i in range(k) for j in range(k))
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_blur_probability():
  x = _random_images((64, 5, 5, 1))
  out, _ = _run("blur(p=0.5)", x)
  same = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
  assert 10 < same.sum() < 54


# ---------------------------------------------------------------------------
# Pipeline.


def test_empty_spec_is_identity():
  x = _random_images((3, 4, 4, 1))
  y = np.eye(3, dtype=np.float32)
  out, out_y = _run("", x, y)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(out_y, y)
  assert augment.output_batch_size("", 7) == 7


SPEC = ("pad_crop(pad=2,mode='reflect')|flip|cutout(size=3)|"
        "cutout_extra(n=2,size=3)|random_erasing|mixup|rotate|blur")


def test_pipeline_deterministic_per_key_and_jittable():
  x = _random_images((6, 8, 8, 3))
  y = np.eye(4, dtype=np.float32)[np.arange(6) % 4]
  fn = jax.jit(augment.make_augment(SPEC, (8, 8, 3), 4))
  run = lambda key: tuple(np.asarray(v) for v in fn(jax.random.key(key), x, y))
  a, b, c = run(1), run(1), run(2)
  assert a[0].shape == (augment.output_batch_size(SPEC, 6), 8, 8, 3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.allclose(a[0], c[0])
  np.testing.assert_allclose(a[1].sum(axis=1), 1.0, atol=1e-6)
  assert a[0].min() >= 0 and a[0].max() <= 1 + 1e-6


def test_each_op_gets_its_own_key():
  x = _random_images((32, 3, 4, 1))
  # Sharing one key would flip the same examples twice: the identity.
  out, _ = _run("flip|flip", x)
  assert not np.array_equal(out, x)
  # Op i draws from fold_in(key, i) whatever follows it.
  first, _ = _run("flip", x)
  out, _ = _run("flip|cutout(size=2,p=0)", x)
  np.testing.assert_array_equal(out, first)


@pytest.mark.parametrize("name", augment.available())
def test_every_op_runs_under_jit_with_defaults(name):
  x = _random_images((4, 16, 16, 3))
  y = np.eye(3, dtype=np.float32)[np.arange(4) % 3]
  out, out_y = _run(name, x, y)
  assert out.shape == (augment.output_batch_size(name, 4), 16, 16, 3)
  assert out_y.shape == (out.shape[0], 3)
  assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1 + 1e-6
  np.testing.assert_allclose(out_y.sum(axis=1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------
# Validation: every bad option fails at build time, naming what to change.


@pytest.mark.parametrize("spec,match", [
    ("crop", "valid choices: blur, cutout, cutout_extra, flip, mixup"),
    ("flip(prob=0.5)", "accepts: p"),
    ("cutout(sz=4)", "accepts: p, size"),
    ("pad_crop(pad=-1)", "'pad' must be >= 0"),
    ("pad_crop(pad=2.5)", "must be an integer"),
    ("pad_crop(pad=8)", "smaller than the image"),
    ("pad_crop(mode='wrap')", "must be one of constant, edge, reflect"),
    ("flip(p=1.5)", r"must lie in \[0, 1\]"),
    ("flip(p=-0.1)", r"must lie in \[0, 1\]"),
    ("flip(p=True)", r"must lie in \[0, 1\]"),
    ("flip(p='a')", r"must lie in \[0, 1\]"),
    ("cutout(size=9)", "larger than the image"),
    ("cutout(size=0)", "'size' must be >= 1"),
    ("cutout(p=2)", r"must lie in \[0, 1\]"),
    ("cutout_extra(n=0)", "'n' must be >= 1"),
    ("cutout_extra(size=9)", "larger than the image"),
    ("random_erasing(p=1.1)", r"must lie in \[0, 1\]"),
    ("random_erasing(scale=(0.02,1.5))", r"within \(0.0, 1.0\]"),
    ("random_erasing(scale=(0.3,0.1))", "min <= max"),
    ("random_erasing(scale=0.3)", "pair of numbers"),
    ("random_erasing(ratio=(0,3.3))", "min <= max"),
    ("random_erasing(value=(0.1,0.2))", "has 2 entries but the images have 3"),
    ("random_erasing(value='random')", "number or one number per channel"),
    ("mixup(alpha=0)", "must be a number > 0"),
    ("mixup(alpha=-1)", "must be a number > 0"),
    ("rotate(degrees=(10,-10))", "min <= max"),
    ("rotate(degrees='x')", "pair of numbers or one number"),
    ("blur(sigma=0)", "min <= max"),
    ("blur(sigma=(2.0,1.0))", "min <= max"),
    ("blur(kernel_size=4)", "must be odd"),
    ("blur(kernel_size=17)", "too large"),
    ("blur(p=-1)", r"must lie in \[0, 1\]"),
    ("flip(p=0.5", "cannot parse"),
    ("cutout(8)", "positional"),
])
def test_validation_errors_at_build_time(spec, match):
  with pytest.raises(ValueError, match=match):
    augment.make_augment(spec, (8, 8, 3), 10)


def test_build_argument_and_batch_errors():
  with pytest.raises(ValueError, match="image_shape"):
    augment.make_augment("flip", (8, 8), 10)
  with pytest.raises(ValueError, match="num_classes"):
    augment.make_augment("flip", (8, 8, 3), 0)
  with pytest.raises(ValueError, match="exceeds the batch size 2"):
    augment.output_batch_size("cutout_extra(n=3)", 2)
  with pytest.raises(ValueError, match="accepts"):
    augment.output_batch_size("cutout_extra(m=3)", 8)
  fn = augment.make_augment("cutout_extra(n=3,size=2)", (4, 4, 1), 2)
  with pytest.raises(ValueError, match="exceeds the batch size 2"):
    fn(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="images"):
    fn(jax.random.key(0), jnp.zeros((4, 5, 4, 1)), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="labels"):
    fn(jax.random.key(0), jnp.zeros((4, 4, 4, 1)), jnp.zeros((4, 3)))


# ---------------------------------------------------------------------------
# Test-time views. The view weights against NumPy: tests/test_speedrun.py.


@pytest.mark.parametrize("mode", config.TTA_MODES)
def test_tta_logits_takes_every_config_mode(mode):
  # Constant images look the same in every view, so weights summing to 1
  # give back the plain logits.
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4 * 4 * 2, 3)),
                  jnp.float32)
  apply_fn = lambda v, x, train: x.reshape(len(x), -1) @ v["w"]
  x = jnp.full((2, 4, 4, 2), 0.5, jnp.float32)
  got = augment.tta_logits(apply_fn, {"w": w}, x, mode)
  np.testing.assert_allclose(np.asarray(got),
                             np.asarray(apply_fn({"w": w}, x, False)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="valid choices: " + ", ".join(
      map(repr, config.TTA_MODES))):
    augment.tta_logits(apply_fn, {"w": w}, x, "mirror")
