"""Image classifiers for the studies, selected by name from `config.model.name`.

Every model is a linen dataclass that receives its normalization as a factory
(`norm: ModuleDef`, resolved once by `build_model` from `config.model.norm`)
and names every submodule explicitly, so parameter paths are stable and
regex masks can select them (the final Dense layer is always `classifier`;
conv and dense weights are always `kernel`). Each model is registered with
the `config.model` options it reads (`options.py`); `validate` refuses the
others when they are set.

Call contract (shared with the train loop):
  model.apply(variables, x, train=bool, rngs={"dropout": key},
              mutable=["batch_stats"] if train else False)
with `x` float32 NHWC standardized images; returns float32 logits
[B, num_classes] (the loss applies log-softmax).

Traced dropout rates: `variables` may also hold a DROPOUT_COLLECTION
("dropout_keep") collection, `dropout_keep(config.model)`: the keep
probability 1 - p of each dropout rate the config sets, as float32 scalars
that may be traced (stacked.py gives each member of a group its own). Every
slot whose rate is in it is then built (even where its static rate is 0)
and draws its mask with that keep probability; with the same dropout rng a
slot of keep 1 - p computes bit for bit what nn.Dropout(p) does, and one of
keep 1 returns its input exactly. Without it, rates are the static fields
and rate-0 slots are skipped in Python, as before.

Models (one module each; `layers.py` holds what they share):
  mnist_cnn     S3: small all-convolutional "EVA" network (~11k params).
  cifar_resnet  S4: ResNet 6n+2 of He et al. 2016, option A shortcuts.
  resnet50      S1/S2: bottleneck ResNet-50 with a CIFAR stem and
                per-slot control of norm and dropout layers.
  resnet9       S5: DavidNet / Myrtle ResNet-9 (~6.57M params).
  nf_resnet     S2: normalization-free bottleneck ResNet-50 (NF-ResNet).
  airbench      Keller Jordan's airbench94 net (~2M params): a frozen
                patch-whitening conv set from the training data
                (`data_init`), then three conv-pool-norm-GELU blocks.

A model that needs the training data to initialise (airbench) has a method
`data_init(params, images_u8, mean, std) -> params`; the trainer calls it
after `init` when present.

Convolutions use Flax's default initializer (LeCun normal); a conv directly
followed by a norm slot has no bias, one without a norm slot has a bias
(airbench keeps its reference's PyTorch initialisation, see there).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from jaxreg import norms
from jaxreg.models import layers
from jaxreg.models import options
# Importing each model's module registers it.
from jaxreg.models.airbench import COMPUTE_DTYPES, Airbench, whitening_kernel
from jaxreg.models.introspect import (capture_features, count_params,
                                      feature_layers)
from jaxreg.models.layers import (DROPOUT_COLLECTION, SLOT_DROPOUTS,
                                  TracedDropout, WSConv, dirac_init)
from jaxreg.models.mnist_cnn import MnistCNN
from jaxreg.models.nf_resnet import RELU_GAMMA, NFResNet, nf_block_betas
from jaxreg.models.options import (DROPOUT_OPTIONS, MODELS, NORM_OPTIONS,
                                   SHARED_OPTIONS, slot_rates, validate)
from jaxreg.models.resnets import BasicBlock, CifarResNet, ResNet9, ResNet50

# Models whose architecture has no norm slot at all (they read no norm
# option).
NORM_FREE_MODELS = frozenset(n for n in MODELS.names()
                             if not MODELS.get(n).norm)


def dropout_keep(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The DROPOUT_COLLECTION of `config.model`'s dropout rates.

  {"dropout": 1 - dropout} for models with one rate; for resnet50 and
  nf_resnet {"drop<k>": 1 - rate of slot k} for the first dropout_layers
  slots (`slot_rates`); {} for airbench. float32 scalars rounded once from
  float64, as nn.Dropout's keep probability is. Passed to a model built
  from a config that differs at most in the rates, it makes that model
  train as one built from `model_cfg` does (module docstring), so the rates
  can be traced.
  """
  kind = MODELS.get(model_cfg.name).dropout  # Unknown names list the valid.
  if kind is None:
    return {}
  if kind == "slots":
    return {n: np.float32(1.0 - p)
            for n, p in zip(SLOT_DROPOUTS, slot_rates(model_cfg))}
  return {"dropout": np.float32(1.0 - float(model_cfg.dropout))}


def build_model(model_cfg: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """Validates `config.model` (`validate`) and builds the named model.

  The norm is resolved once, for the models with norm slots, so every bad
  option fails here, before any tracing.
  """
  validate(model_cfg, num_classes)
  spec = MODELS.get(model_cfg.name)
  norm = (norms.make_norm_from_config(model_cfg.norm, model_cfg.norm_kwargs)
          if spec.norm else None)
  return spec.build(model_cfg, int(num_classes), norm)
