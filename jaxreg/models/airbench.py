"""Speedrun: Keller Jordan's airbench94 network
(github.com/KellerJordan/cifar10-airbench), with its patch-whitening conv
set from the training data (`Airbench.data_init`, `whitening_kernel`)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxreg.models import layers
from jaxreg.models import options

Array = layers.Array

# Dtypes the convs and classifier may compute in (config.model.dtype).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                  "float16": jnp.float16}


def patch_second_moment(images: np.ndarray, patch: int,
                        chunk: int = 512) -> tuple[np.ndarray, int]:
  """Sum of p p^T over every (patch x patch x C) window p of `images`
  (stride 1, valid), flattened in (h, w, c) order, in float64; and the
  number of windows. Uncentred, as airbench's covariance estimate."""
  images = np.asarray(images, np.float64)
  n, h, w, c = images.shape
  if h < patch or w < patch:
    raise ValueError(f"images of {h}x{w} are smaller than the {patch}x{patch} "
                     "whitening patch; lower config.model.whiten_patch")
  dim = patch * patch * c
  total = np.zeros((dim, dim))
  count = 0
  for start in range(0, n, chunk):
    x = images[start:start + chunk]
    windows = np.lib.stride_tricks.sliding_window_view(x, (patch, patch),
                                                       axis=(1, 2))
    # [b, H', W', c, ph, pw] -> rows in (ph, pw, c) order, the HWIO layout.
    rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
    total += rows.T @ rows
    count += len(rows)
  return total, count


def whitening_kernel(images_u8: np.ndarray, mean: Any, std: Any, *,
                     patch: int = 2, eps: float = 5e-4) -> np.ndarray:
  """airbench's patch-whitening conv kernel from uint8 NHWC images.

  Images are standardized as the model sees them, ((x / 255) - mean) / std;
  the second moment S = E[p p^T] of their patch x patch x C windows is
  decomposed as S = V diag(lambda) V^T (float64), and output channel k of
  the kernel is v_k / sqrt(lambda_k + eps), eigenvalues in descending order,
  followed by the same filters negated (so a GELU after it keeps both
  signs). The first half of the outputs thus has second moment
  diag(lambda / (lambda + eps)), the identity up to eps.

  Returns:
    float32 HWIO kernel [patch, patch, C, 2 * patch * patch * C].
  """
  images = np.asarray(images_u8)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"whitening_kernel needs uint8 [N, H, W, C] images, got "
                     f"{images.dtype} {images.shape}")
  x = (images.astype(np.float64) / 255.0 - np.asarray(mean, np.float64)) \
      / np.asarray(std, np.float64)
  total, count = patch_second_moment(x, patch)
  eigenvalues, eigenvectors = np.linalg.eigh(total / count)
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
  filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
  c = images.shape[-1]
  kernel = filters.reshape(patch, patch, c, -1)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


class AirbenchBlock(nn.Module):
  """conv3x3 -> 2x2 max-pool -> norm -> GELU -> conv3x3 -> norm -> GELU
  (airbench's ConvGroup; convs without bias, identity-initialised)."""
  features: int
  norm: layers.ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for k in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False,
                  dtype=self.dtype, kernel_init=layers.dirac_init(),
                  name=f"conv{k}")(x)
      if k == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = self.norm(name=f"norm{k}")(x, train=train)
      # PyTorch's nn.GELU is the exact (erf) one.
      x = nn.gelu(x, approximate=False)
    return x


class Airbench(nn.Module):
  """airbench94's network (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds").

  whiten (patch x patch conv, 2 * patch^2 * C outputs, VALID, with bias;
  its kernel comes from `data_init` and is meant to stay frozen) -> GELU ->
  three AirbenchBlocks of widths width * (1, 4, 4) -> 3x3 max-pool (stride
  3; on CIFAR the 3x3 map that is left, so a global max) -> global max over
  what remains -> Dense `classifier` (no bias) -> logits * logit_scale.

  Convs and the classifier use PyTorch's default init, block convs with
  identity (dirac) init on their first C_in outputs, as the reference.
  Norms, their affine parameters and the logits stay float32; convs and the
  classifier compute in `dtype` (airbench: float16 everywhere but the BN).
  """
  num_classes: int
  norm: layers.ModuleDef
  width: int = 64
  logit_scale: float = 1.0 / 9.0
  whiten_patch: int = 2
  whiten_eps: float = 5e-4
  whiten_images: int = 5000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    p = self.whiten_patch
    channels = 2 * p * p * x.shape[-1]
    x = nn.Conv(channels, (p, p), padding="VALID", use_bias=True,
                dtype=self.dtype, kernel_init=layers.torch_default_init,
                name="whiten")(x.astype(self.dtype))
    x = nn.gelu(x, approximate=False)
    for i, mult in enumerate((1, 4, 4), start=1):
      x = AirbenchBlock(self.width * mult, self.norm, self.dtype,
                        name=f"block{i}")(x, train)
    if min(x.shape[1:3]) >= 3:
      x = nn.max_pool(x, (3, 3), strides=(3, 3))
    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                 kernel_init=layers.torch_default_init, name="classifier")(x)
    return x.astype(jnp.float32) * self.logit_scale

  def data_init(self, params: Any, images_u8: np.ndarray, mean: Any,
                std: Any) -> Any:
    """`params` with whiten/kernel set from the first `whiten_images`
    training images (see `whitening_kernel`) and whiten/bias zeroed."""
    kernel = whitening_kernel(images_u8[:self.whiten_images], mean, std,
                              patch=self.whiten_patch, eps=self.whiten_eps)
    old = params["whiten"]
    if old["kernel"].shape != kernel.shape:
      raise ValueError(f"whitening kernel {kernel.shape} does not fit the "
                       f"model's whiten/kernel {old['kernel'].shape}: the "
                       "images and the model disagree on channels")
    whiten = {"kernel": jnp.asarray(kernel),
              "bias": jnp.zeros_like(old["bias"])}
    return {**params, "whiten": whiten}


@options.register("airbench", {
    "width": options.positive_int, "logit_scale": options.positive_number,
    "whiten_patch": options.positive_int,
    "whiten_eps": options.positive_number,
    "whiten_images": options.positive_int,
    "dtype": options.one_of(COMPUTE_DTYPES)}, dropout=None)
def _build_airbench(cfg, num_classes, norm):
  return Airbench(num_classes, norm, width=int(cfg.width),
                  logit_scale=float(cfg.logit_scale),
                  whiten_patch=int(cfg.whiten_patch),
                  whiten_eps=float(cfg.whiten_eps),
                  whiten_images=int(cfg.whiten_images),
                  dtype=COMPUTE_DTYPES[cfg.dtype])
