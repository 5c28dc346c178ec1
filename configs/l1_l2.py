"""Study S3: BatchNorm / GroupNorm / LayerNorm with L1 and L2 on MNIST.

Source settings (studies.md, S3): the small all-convolutional MNIST network
(`mnist_cnn`, ~11k parameters; conv -> ReLU -> dropout -> norm blocks), SGD
lr 0.04 with momentum 0.9, dropout 0.05, batch 128, 20 epochs. Three variants:

  norm=batch + L1 1e-4 + L2 1e-3
  norm=group (2 groups) + L1 1e-4
  norm=layer + L2 1e-3

Choices made here, where S3 is silent:
  * L1 is `optimizer.l1` (the gradient of lambda * sum|w|, i.e. lambda *
    sign(w), added to the gradient); L2 is `optimizer.weight_decay`, coupled
    (added to the gradient before momentum, as PyTorch SGD's weight_decay,
    the gradient of (lambda / 2) * ||w||^2). Both act on conv and dense
    kernels only (the default masks): not on norm scales or biases.
  * Every variant sets both l1 and weight_decay (0 where unused), so the
    summary table has a value in every cell.
  * Constant learning rate (S3 names no schedule); no validation split: the
    reported "validation" figures of S3 are on the MNIST test set, as here.
  * BatchNorm running statistics use momentum 0.9 (Flax convention; PyTorch's
    0.1), the jaxreg default.
  * target_accuracy 0.99 (time to 99% test accuracy is reported).

Run:
  python launch.py --config=configs/l1_l2.py               # the 3 variants
  python launch.py --config=configs/l1_l2.py:smoke         # seconds, all 3

Args (after ':'; combine with ','):
  smoke  1024 training and 500 test images, 2 epochs; still all 3 variants.
"""
from __future__ import annotations

import ml_collections

from jaxreg import config as config_lib

ARGS = ("smoke",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The S3 recipe shared by every variant: configs/mnist.py's."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  c = config_lib.sibling(__file__, "mnist.py").get_config()
  c.name = "l1_l2"
  if "smoke" in args:
    c.dataset.train_size = 1024
    c.dataset.test_size = 500
    c.train.epochs = 2
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The three S3 variants (also in smoke mode)."""
  config_lib.parse_args(arg, ARGS, __file__)
  return [
      {"model.norm": "batch", "optimizer.l1": 1e-4,
       "optimizer.weight_decay": 1e-3},
      {"model.norm": "group", "model.norm_kwargs.num_groups": 2,
       "optimizer.l1": 1e-4, "optimizer.weight_decay": 0.0},
      {"model.norm": "layer", "optimizer.l1": 0.0,
       "optimizer.weight_decay": 1e-3},
  ]


def get_report(arg: str | None = None) -> dict:
  """The baseline every variant is compared with: GN + L1.

  S3 has no unregularized variant, and its open question is whether GN + L1
  (one group's winner, 99.14%) or LN + L2 (the other group's, and jaxreg's
  single-seed best) is better. With GN + L1 as the baseline, the LN + L2 row
  tests that dispute directly, and the BN + L1 + L2 row says whether
  BatchNorm with both penalties differs from it.
  """
  config_lib.parse_args(arg, ARGS, __file__)
  return {"baseline": {"model.norm": "group"}}
