"""Normalization layers, selected by name from `config.model.norm`.

Contract shared by every entry (models rely on it):
  * `make_norm(name, **kwargs)` validates the options once and returns a
    factory (a `functools.partial` of a linen Module class), never an
    instance, so each call site creates its own layer.
  * A model calls it as `self.norm(name="norm1")(x, train=train)` on NHWC
    (or NC) features. `train=True` uses batch statistics and updates the
    running ones in the `batch_stats` collection; `train=False` uses the
    running statistics. Norms without running statistics ignore `train`.
  * Learnable per-channel affine parameters are named `scale` and `bias`
    so weight-decay masks can leave them out by name.

Entries (statistics are always biased variances, computed in at least
float32; outputs keep the input dtype, except `batch_flax`, which follows
Flax and promotes to the parameter dtype):

  name            normalizes over                      state
  batch           (N, H, W) per channel                batch_stats mean/var
  batch_flax      same, Flax's nn.BatchNorm            batch_stats mean/var
  group           (H, W, C/G channels) per sample      -
  layer           (H, W, C) per sample = group, G=1    -
  instance        (H, W) per sample and channel        -
  batch_instance  gate*batch + (1-gate)*instance       batch_stats mean/var
  none            identity                             -

Running statistics use the Flax momentum convention,
`running = momentum * running + (1 - momentum) * batch`, with momentum 0.9
by default (PyTorch's momentum=0.1). Options are set from
`config.model.norm_kwargs` (defaults: `jaxreg.config.norm_kwargs_config`);
a norm refuses options it does not take.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxreg.registry import Registry, check_kwargs

ModuleDef = Any
NORMS: Registry[type] = Registry("norm")
# The options each norm takes from the config, by name.
OPTIONS: dict[str, tuple[str, ...]] = {}
_VALIDATORS: dict[str, Callable[[dict], dict]] = {}

# Names of the norms whose modules write the `batch_stats` collection.
KEEPS_RUNNING_STATS: frozenset[str] = frozenset(
    {"batch", "batch_flax", "batch_instance"})

_CFG = "config.model.norm_kwargs"


def register(name: str, options: tuple[str, ...],
             validate: Callable[[dict], dict] | None = None):
  """Registers a norm class, the options it takes and an option checker.

  Args:
    name: the name used in `config.model.norm`.
    options: the keyword arguments the class accepts from the config.
    validate: optional function that checks the (already name-checked)
      options and returns the keyword arguments to bind, so bad values fail
      when the model is built rather than inside a traced function.
  """
  def deco(cls):
    NORMS.add(name, cls)
    OPTIONS[name] = options
    if validate is not None:
      _VALIDATORS[name] = validate
    return cls
  return deco


def make_norm(name: str, **kwargs) -> Callable[..., nn.Module]:
  """Resolves a norm name and its options into a module factory."""
  cls = NORMS.get(name)
  check_kwargs("norm", name, kwargs, OPTIONS[name])
  if name in _VALIDATORS:
    kwargs = _VALIDATORS[name](dict(kwargs))
  return functools.partial(cls, **kwargs)


def make_norm_from_config(
    name: str,
    norm_kwargs_cfg: ml_collections.ConfigDict | Mapping[str, Any] | None,
) -> Callable[..., nn.Module]:
  """`make_norm(name, **options)` with the options that are set (not None)."""
  if norm_kwargs_cfg is None:
    items = {}
  elif isinstance(norm_kwargs_cfg, ml_collections.ConfigDict):
    items = norm_kwargs_cfg.to_dict()
  else:
    items = dict(norm_kwargs_cfg)
  return make_norm(name, **{k: v for k, v in items.items() if v is not None})


# --------------------------------------------------------------------------
# Option checks (run by make_norm, before any model is built).


def _check_epsilon(kw: dict) -> dict:
  if "epsilon" in kw:
    eps = kw["epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
      raise ValueError(f"{_CFG}.epsilon must be a positive number, got {eps!r}")
    kw["epsilon"] = float(eps)
  return kw


def _check_momentum(kw: dict) -> dict:
  if "momentum" in kw:
    m = kw["momentum"]
    if (isinstance(m, bool) or not isinstance(m, (int, float))
        or not 0.0 <= m <= 1.0):
      raise ValueError(
          f"{_CFG}.momentum must be in [0, 1] (Flax convention: running = "
          f"momentum*running + (1-momentum)*batch; PyTorch's 0.1 is 0.9 "
          f"here), got {m!r}")
    kw["momentum"] = float(m)
  return kw


def _check_positive_int(kw: dict, key: str) -> dict:
  if kw.get(key) is not None:
    v = kw[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{_CFG}.{key} must be a positive integer, got {v!r}")
  return kw


def _check_batch(kw: dict) -> dict:
  kw = _check_momentum(_check_epsilon(kw))
  kw = _check_positive_int(kw, "virtual_batch_size")
  if "unbiased_running_var" in kw and not isinstance(
      kw["unbiased_running_var"], bool):
    raise ValueError(f"{_CFG}.unbiased_running_var must be True or False, "
                     f"got {kw['unbiased_running_var']!r}")
  return kw


def _check_batch_flax(kw: dict) -> dict:
  return _check_momentum(_check_epsilon(kw))


def _check_group(kw: dict) -> dict:
  kw = _check_epsilon(kw)
  kw = _check_positive_int(_check_positive_int(kw, "num_groups"), "group_size")
  if kw.get("group_size") is not None:
    if kw.get("num_groups") is not None:
      raise ValueError(
          f"group norm takes either {_CFG}.num_groups or {_CFG}.group_size, "
          f"not both (got num_groups={kw['num_groups']}, "
          f"group_size={kw['group_size']}); unset one of them")
    # The class default is num_groups=2; group_size replaces it.
    kw["num_groups"] = None
  return kw


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# --------------------------------------------------------------------------
# Shared computations. Each takes x already promoted to >= float32.


def _stat_dtype(x) -> jnp.dtype:
  # bfloat16/float16 statistics lose too much precision; float64 (x64) stays.
  return jnp.promote_types(x.dtype, jnp.float32)


class _RunningStatsNorm(nn.Module):
  """The options of the norms with running statistics (`batch`,
  `batch_instance`; see BatchNorm), read by `_batch_normalize`."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  virtual_batch_size: int | None = None
  unbiased_running_var: bool = False


def _batch_normalize(module: _RunningStatsNorm, x, train: bool, kind: str,
                     affine: tuple[Any, Any] | None = None):
  """(x - mean) / sqrt(var + eps) per channel, then `scale * . + bias` when
  `affine` = (scale, bias) is given.

  Options come from `module`, which also gets the `batch_stats` `mean` and
  `var`. In training, the
  statistics are taken per virtual batch (all of the batch when
  `virtual_batch_size` is None) and the running statistics move towards
  their mean over virtual batches. They are not moved during `init`, as in
  Flax, so `init(..., train=True)` leaves them at zeros/ones. With `affine`,
  training goes through `batch_norm_affine` (closed-form backward pass).
  """
  momentum, epsilon = module.momentum, module.epsilon
  virtual_batch_size = module.virtual_batch_size
  if x.ndim < 2:
    raise ValueError(f"{kind} norm needs [N, ..., C] input, got shape "
                     f"{x.shape}")
  channels = x.shape[-1]
  ra_mean = module.variable("batch_stats", "mean",
                            lambda: jnp.zeros((channels,), jnp.float32))
  ra_var = module.variable("batch_stats", "var",
                           lambda: jnp.ones((channels,), jnp.float32))
  if not train:
    y = (x - ra_mean.value) * jnp.reciprocal(
        jnp.sqrt(ra_var.value.astype(x.dtype) + epsilon))
    return y if affine is None else y * affine[0] + affine[1]

  n = x.shape[0]
  if virtual_batch_size is None:
    groups = 1
  else:
    if n % virtual_batch_size:
      raise ValueError(
          f"{kind} norm: the batch of {n} examples does not split into "
          f"virtual batches of {virtual_batch_size} "
          f"({_CFG}.virtual_batch_size); use a batch size that is a multiple "
          f"of it, or a virtual_batch_size dividing {n} "
          f"({_divisors(n)})")
    groups = n // virtual_batch_size
  xg = x.reshape((groups, n // groups) + x.shape[1:])
  # With `affine` the statistics are computed again inside
  # batch_norm_affine, by the same expressions: XLA computes them once.
  mean, var, r = _bn_stats(
      xg if affine is None else jax.lax.stop_gradient(xg), epsilon)

  if not module.is_initializing():
    count = math.prod(xg.shape[1:-1])  # values per channel per virtual batch
    if module.unbiased_running_var:
      if count < 2:
        raise ValueError(
            f"{kind} norm: unbiased_running_var needs more than one value per "
            f"channel in each (virtual) batch, got {count}")
      run_var = var * (count / (count - 1))
    else:
      run_var = var
    batch_mean = mean.reshape(groups, channels).mean(0)
    batch_var = run_var.reshape(groups, channels).mean(0)
    ra_mean.value = (momentum * ra_mean.value
                     + (1.0 - momentum) * batch_mean.astype(jnp.float32))
    ra_var.value = (momentum * ra_var.value
                    + (1.0 - momentum) * batch_var.astype(jnp.float32))

  if affine is None:
    y = (xg - mean) * r
  else:
    y = batch_norm_affine(xg, affine[0], affine[1], epsilon)
  return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_affine(xg, scale, bias, epsilon: float):
  """scale * (xg - mean) / sqrt(var + epsilon) + bias, the statistics over
  every axis of `xg` but the first (virtual batches) and the last
  (channels), with the closed-form backward pass.

  Autodiff of the forward computation writes the backward as many small
  reductions and elementwise passes; the closed form (as cuDNN's and
  PyTorch's kernels) needs two reductions per channel, sum(g) and
  sum(g * xhat), which are also the bias and scale gradients, and one
  elementwise pass: dx = scale * r * (g - mean(g) - xhat * mean(g * xhat)),
  r = 1 / sqrt(var + epsilon).
  """
  y, _ = _bn_affine_fwd(xg, scale, bias, epsilon)
  return y


def _bn_stats(xg, epsilon: float):
  axes = tuple(range(1, xg.ndim - 1))
  mean = xg.mean(axes, keepdims=True)
  # Two-pass variance: E[x^2] - E[x]^2 cancels badly when |mean| >> std.
  var = jnp.square(xg - mean).mean(axes, keepdims=True)
  return mean, var, jnp.reciprocal(jnp.sqrt(var + epsilon))


def _bn_affine_fwd(xg, scale, bias, epsilon: float):
  mean, _, r = _bn_stats(xg, epsilon)
  y = (xg - mean) * r * scale + bias
  return y, (xg, mean, r, scale)


def _bn_affine_bwd(epsilon: float, res, g):
  del epsilon
  xg, mean, r, scale = res
  axes = tuple(range(1, xg.ndim - 1))
  count = math.prod(xg.shape[1:-1])
  xhat = (xg - mean) * r
  sum_g = g.sum(axes, keepdims=True)
  sum_gx = (g * xhat).sum(axes, keepdims=True)
  dx = (scale * r) * (g - (sum_g + xhat * sum_gx) / count)
  flat = lambda a: a.reshape(-1, a.shape[-1]).sum(0)
  return dx, flat(sum_gx), flat(sum_g)


batch_norm_affine.defvjp(_bn_affine_fwd, _bn_affine_bwd)


def _instance_normalize(x, epsilon: float, kind: str):
  """Per sample and channel over the spatial axes, without affine."""
  if x.ndim < 3:
    raise ValueError(
        f"{kind} norm normalizes each channel over the spatial axes, so it "
        f"needs [N, H, W, C] (or [N, L, C]) input, got shape {x.shape}; use "
        f"layer or batch norm after dense layers")
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axes, keepdims=True)
  var = jnp.square(x - mean).mean(axes, keepdims=True)
  return (x - mean) * jnp.reciprocal(jnp.sqrt(var + epsilon))


def _affine_params(module: nn.Module, channels: int):
  scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
  bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
  return scale, bias


def _affine(module: nn.Module, y, channels: int):
  scale, bias = _affine_params(module, channels)
  return y * scale + bias


def _check_groups(channels: int, num_groups: int | None,
                  group_size: int | None):
  if group_size is not None:
    if channels % group_size:
      raise ValueError(
          f"group norm: group_size={group_size} does not divide the "
          f"{channels} channels; set {_CFG}.group_size to a divisor of "
          f"{channels} ({_divisors(channels)})")
  elif channels % num_groups:
    raise ValueError(
        f"group norm: num_groups={num_groups} does not divide the {channels} "
        f"channels; set {_CFG}.num_groups to a divisor of {channels} "
        f"({_divisors(channels)})")


# --------------------------------------------------------------------------
# The norms.


@register("none", ())
class Identity(nn.Module):
  """No normalization."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return x


@register("batch_flax", ("momentum", "epsilon"), _check_batch_flax)
class FlaxBatchNorm(nn.BatchNorm):
  """Flax's built-in BatchNorm (Flax momentum convention:
  running = momentum * running + (1 - momentum) * batch)."""
  momentum: float = 0.9
  epsilon: float = 1e-5

  def __call__(self, x, train: bool = False):  # pytype: disable=signature-mismatch
    return super().__call__(x, use_running_average=not train)


@register("batch", ("momentum", "epsilon", "virtual_batch_size",
                    "unbiased_running_var"), _check_batch)
class BatchNorm(_RunningStatsNorm):
  """jaxreg's own BatchNorm; agrees with `batch_flax` at default options.

  Normalizes each channel over every axis but the last with the biased batch
  variance (train) or the running statistics (eval), then applies the
  per-channel `scale` and `bias`.

  Attributes:
    momentum: Flax convention, running = momentum*running + (1-momentum)*batch.
    epsilon: added to the variance.
    virtual_batch_size: if set, "ghost" batch norm: statistics per group of
      this many consecutive examples (the batch must be a multiple of it),
      so results do not depend on the global batch or the device count. The
      running statistics move towards the mean over groups.
    unbiased_running_var: PyTorch's convention: the running variance tracks
      n/(n-1) times the batch variance (n values per channel per group).
      False (default) matches Flax. Normalization always uses the biased one.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    x32 = x.astype(_stat_dtype(x))
    y = _batch_normalize(self, x32, train, "batch",
                         _affine_params(self, x.shape[-1]))
    return y.astype(x.dtype)


@register("group", ("num_groups", "group_size", "epsilon"), _check_group)
class GroupNorm(nn.GroupNorm):
  """Flax GroupNorm, per sample over (H, W) and C/G channels per group.

  Defaults follow study S3 (2 groups); `group_size` may be given instead of
  `num_groups`. Variance is two-pass (`use_fast_variance=False`) since
  post-ReLU features have |mean| comparable to their std.
  """
  num_groups: int | None = 2
  group_size: int | None = None
  epsilon: float = 1e-5
  use_fast_variance: bool = False

  def __call__(self, x, train: bool = False):  # pytype: disable=signature-mismatch
    del train
    _check_groups(x.shape[-1], self.num_groups, self.group_size)
    return super().__call__(x).astype(x.dtype)


@register("layer", ("epsilon",), _check_epsilon)
class LayerNorm(GroupNorm):
  """Layer norm for conv features: GroupNorm with one group.

  Each sample is normalized over all of (H, W, C) (over C for [N, C] input)
  with per-channel `scale` and `bias`. This is not Flax's default
  `nn.LayerNorm`, which normalizes over the last axis only.
  """
  num_groups: int | None = 1


@register("instance", ("epsilon",), _check_epsilon)
class InstanceNorm(nn.Module):
  """Instance norm: per sample and channel over (H, W); no running stats."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    y = _instance_normalize(x.astype(_stat_dtype(x)), self.epsilon, "instance")
    return _affine(self, y, x.shape[-1]).astype(x.dtype)


@register("batch_instance", ("momentum", "epsilon", "virtual_batch_size",
                             "unbiased_running_var"), _check_batch)
class BatchInstanceNorm(_RunningStatsNorm):
  """Batch-instance norm (Nam & Kim 2018).

  y = scale * (gate * BN(x) + (1 - gate) * IN(x)) + bias, with a per-channel
  `gate` (rho in the paper) initialised to 1, i.e. starting as batch norm.
  The BN part behaves as `batch` (running statistics in `batch_stats`, same
  options); the IN part always uses per-sample statistics. The gate must
  stay in [0, 1]: the optimizer clips params named `gate` after every update
  (jaxreg.optim) and keeps them out of weight decay; this module does not
  clip.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    channels = x.shape[-1]
    x32 = x.astype(_stat_dtype(x))
    y_in = _instance_normalize(x32, self.epsilon, "batch_instance")
    y_bn = _batch_normalize(self, x32, train, "batch_instance")
    gate = self.param("gate", nn.initializers.ones, (channels,), jnp.float32)
    y = gate * y_bn + (1.0 - gate) * y_in
    return _affine(self, y, channels).astype(x.dtype)
