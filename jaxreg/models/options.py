"""The model registry: which `config.model` options each model reads.

Every model registers its builder with `register(name, options=..., ...)`,
declaring the options it reads besides those of its families:

  every model         name
  norm=True           norm, norm_kwargs (the norm slots' factory)
  dropout="one"       dropout (one rate for every slot)
  dropout="slots"     dropout, dropout_layers, dropout_per_slot (one rate
                      per bottleneck slot, `slot_rates`)

The defaults of all of them stay in one flat section,
`jaxreg.config.model_config()`, so config files and sweeps over model.name
need no per-model sections. `validate` checks only the chosen model's
options, and refuses an option it does not read when that option is set to
anything but its default (or a value the model declares `tolerated`: one
that agrees with it, e.g. norm_layers=0 for the normalization-free
nf_resnet), so a setting never silently does nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from jaxreg import config as config_lib
from jaxreg import norms
from jaxreg.registry import Registry

# check(model_cfg, key) raises ValueError when config.model.<key> is bad.
Check = Callable[[ml_collections.ConfigDict, str], None]
# build(model_cfg, num_classes, norm factory or None) -> linen Module.
Builder = Callable[[ml_collections.ConfigDict, int, Any], Any]

_CFG = "config.model"


def _fail(key: str, value: Any, want: str) -> None:
  raise ValueError(f"{_CFG}.{key}={value!r}: {want}")


def positive_int(cfg: ml_collections.ConfigDict, key: str) -> None:
  if not isinstance(cfg[key], int) or cfg[key] < 1:
    _fail(key, cfg[key], "set a positive integer")


def positive_number(cfg: ml_collections.ConfigDict, key: str) -> None:
  if not cfg[key] > 0:
    _fail(key, cfg[key], "set a positive number")


def probability(cfg: ml_collections.ConfigDict, key: str) -> None:
  if not 0.0 <= cfg[key] < 1.0:
    _fail(key, cfg[key], "set a probability in [0, 1)")


def slot_count(cfg: ml_collections.ConfigDict, key: str) -> None:
  value = cfg[key]
  if not isinstance(value, int) or not 0 <= value <= 3:
    _fail(key, value, "set it to an integer in 0..3 (how many of the three "
          "bottleneck conv slots it applies to)")


def block_counts(cfg: ml_collections.ConfigDict, key: str) -> None:
  sizes = tuple(cfg[key])
  if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
    _fail(key, sizes, "give a non-empty tuple of positive block counts, e.g. "
          "(3, 4, 6, 3)")


def one_of(choices: Mapping[str, Any] | tuple[str, ...]) -> Check:
  """A check that the option is one of `choices`."""

  def check(cfg: ml_collections.ConfigDict, key: str) -> None:
    if cfg[key] not in choices:
      _fail(key, cfg[key], f"valid choices: {', '.join(choices)}")

  return check


def _per_slot(cfg: ml_collections.ConfigDict, key: str) -> None:
  if cfg[key] is None:
    return
  rates = tuple(cfg[key])
  if len(rates) != cfg.dropout_layers:
    raise ValueError(
        f"{_CFG}.{key}={rates!r} has {len(rates)} values but "
        f"dropout_layers={cfg.dropout_layers}: give exactly one probability "
        "per dropout slot, or change dropout_layers")
  if not all(0.0 <= p < 1.0 for p in rates):
    _fail(key, rates, "every probability must be in [0, 1)")


def _norm(cfg: ml_collections.ConfigDict, key: str) -> None:
  del key  # Name and options are checked together.
  norms.make_norm_from_config(cfg.norm, cfg.norm_kwargs)


# The families of options (module docstring). None: checked with another.
SHARED_OPTIONS: dict[str, Check | None] = {"name": None}
NORM_OPTIONS: dict[str, Check | None] = {"norm": _norm, "norm_kwargs": None}
DROPOUT_OPTIONS: dict[str | None, dict[str, Check | None]] = {
    None: {},
    "one": {"dropout": probability},
    "slots": {"dropout": probability, "dropout_layers": slot_count,
              "dropout_per_slot": _per_slot},
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model.

  Attributes:
    build: the builder, (model_cfg, num_classes, norm) -> Module; `norm` is
      the resolved factory, None for a model without norm slots.
    own: the options only some models read, with their checks.
    norm: whether it has norm slots (reads norm and norm_kwargs).
    dropout: its dropout family: None, "one" or "slots".
    tolerated: values of options it does not read that agree with it.
  """
  build: Builder
  own: Mapping[str, Check | None]
  norm: bool = True
  dropout: str | None = "one"
  tolerated: Mapping[str, tuple[Any, ...]] = dataclasses.field(
      default_factory=dict)

  @property
  def options(self) -> dict[str, Check | None]:
    """Every option it reads (families included), with its check."""
    return {**SHARED_OPTIONS, **(NORM_OPTIONS if self.norm else {}),
            **DROPOUT_OPTIONS[self.dropout], **self.own}


MODELS: Registry[ModelSpec] = Registry("model")


def register(name: str, options: Mapping[str, Check | None], *,
             norm: bool = True, dropout: str | None = "one",
             tolerated: Mapping[str, tuple[Any, ...]] | None = None
             ) -> Callable[[Builder], Builder]:
  """Decorator registering a model builder and the options it reads.

  Args:
    name: the name used in `config.model.name`.
    options: its own options (beyond its families) and their checks; each
      must have a default in `config.model_config()`.
    norm: whether it has norm slots.
    dropout: None, "one" or "slots" (module docstring).
    tolerated: option -> values accepted though the model does not read it.
  """
  if dropout not in DROPOUT_OPTIONS:
    raise ValueError(f"model {name!r}: dropout={dropout!r}; valid choices: "
                     f"{', '.join(map(repr, DROPOUT_OPTIONS))}")

  def deco(build: Builder) -> Builder:
    MODELS.add(name, ModelSpec(build, dict(options), norm, dropout,
                               dict(tolerated or {})))
    return build

  return deco


def slot_rates(model_cfg: ml_collections.ConfigDict, pad: bool = False
               ) -> tuple[float, ...]:
  """Dropout probability of each of the first dropout_layers bottleneck
  slots: dropout_per_slot if set (it wins over dropout), else dropout;
  with `pad`, followed by 0.0 for the other slots (three in all)."""
  k = int(model_cfg.dropout_layers)
  rates = (tuple(float(p) for p in model_cfg.dropout_per_slot)
           if model_cfg.dropout_per_slot is not None
           else (float(model_cfg.dropout),) * k)
  return rates + (0.0,) * (3 - k) if pad else rates


def _leaves(cfg: ml_collections.ConfigDict, prefix: str = ""
            ) -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else value
  return out


def _readers(option: str) -> list[str]:
  return [n for n in MODELS.names() if option in MODELS.get(n).options]


def validate(model_cfg: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses bad `config.model` options before anything is traced.

  Checks the chosen model's options, and that every option it does not
  read is at its default (or a value it tolerates).

  Raises:
    ValueError: an unknown model name (listing the valid ones), a bad
      value, or options the model does not read set to other values (one
      error naming each dotted key, its value, the models that read it, and
      the options this model takes).
  """
  name = model_cfg.name
  spec = MODELS.get(name)  # Unknown names list the valid ones.
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(
        f"num_classes={num_classes!r}: a classifier needs an integer >= 2 "
        "classes; check the dataset's label count")
  reads = spec.options
  defaults = _leaves(config_lib.model_config())
  unread = []
  for key, value in _leaves(model_cfg).items():
    option = key.split(".")[0]
    if option in reads:
      continue
    if key not in defaults:
      raise ValueError(f"{_CFG}.{key} is not an option of any model; model "
                       f"options: {', '.join(sorted(defaults))}")
    if value != defaults[key] and value not in spec.tolerated.get(key, ()):
      readers = ", ".join(_readers(option))
      unread.append((f"{_CFG}.{key}={value!r} (read by {readers})",
                     f"{key}={defaults[key]!r}"))
  if unread:
    raise ValueError(
        f"{'; '.join(u for u, _ in unread)}: not read by model {name!r}, "
        f"which takes {', '.join(sorted(reads))}; set them back to their "
        f"defaults ({', '.join(d for _, d in unread)}) or choose a model "
        "that reads them")
  for key, check in reads.items():
    if check is not None:
      check(model_cfg, key)
