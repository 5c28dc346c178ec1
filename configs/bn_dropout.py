"""Study S1: BatchNorm layers x dropout layers x dropout p x batch size.

Source settings (studies.md, S1): bottleneck ResNet-50 with a CIFAR stem
(`resnet50`: 3x3 stem conv, no max-pool) on CIFAR-10. In every bottleneck
the first `norm_layers` of the three conv slots are followed by BatchNorm
(0 = normalization-free, also no stem/projection norm) and the first
`dropout_layers` by dropout with probability p. Grid:

  norm_layers    0, 1, 2, 3
  dropout_layers 0, 1, 2, 3
  p              0.2, 0.5, 0.8
  batch/epochs   64 for 200 epochs, 256 for 100 epochs (zipped)

p cannot matter without a dropout slot, so dropout_layers=0 appears once per
(norm_layers, batch), with p written as 0: 4 x (1 + 3 x 3) x 2 = 80
variants. Metrics: final test accuracy, training time, and time to 87% test
accuracy (target_accuracy 0.87; "never" when not reached). Reported: p=0.2
best everywhere; 1 BN layer shortest training time, 2 BN layers shortest
time to 87%; best at batch 64 2 BN + 3 dropout, at batch 256 2 BN + 2
dropout (both p 0.2).

The optimizer (S1 names none) is the standard CIFAR ResNet SGD recipe:
  * SGD lr 0.1, momentum 0.9 (no Nesterov), at both batch sizes;
  * cosine decay to 0 after a 2-epoch linear warmup: the warmup guards the
    normalization-free (norm_layers=0) variants against the large first
    steps at lr 0.1; it is the same for every variant, so comparisons stay
    fair;
  * no weight decay, no augmentation, no label smoothing. S1 studies BN and
    dropout as the regularizers, and its final-models baseline is "no
    regularization" (configs/augment.py): here "regularization" means
    weight decay / L1, dropout, BatchNorm (its batch noise) and data
    augmentation, and only the two studied ones vary. The same recipe is
    the starting point of configs/agc.py and configs/augment.py, so their
    runs compare with these.
  * BatchNorm is jaxreg's own (`batch`), statistics over the whole batch,
    running-statistics momentum 0.9 (Flax convention; PyTorch's 0.1).
  * No validation split (S1 reports test accuracy only).

Run:
  python launch.py --config=configs/bn_dropout.py            # 80 variants
  python launch.py --config=configs/bn_dropout.py --num_shards=4 --shard_index=0
  python launch.py --config=configs/bn_dropout.py:smoke      # seconds, 4

Args (after ':'):
  smoke  ResNet-50 shrunk to stage_sizes (1,1,1,1) and width 8, 512
         training / 256 test images, batch 64 for 2 epochs and batch 256 for
         1 epoch, 0.5-epoch warmup; a representative subset of 4 variants
         (norm-free without dropout; 1 BN + 1 dropout p 0.8; 2 BN + 2
         dropout p 0.2; 3 BN + 3 dropout p 0.5), covering both batch sizes.
"""
from __future__ import annotations

import ml_collections

from jaxreg import config as config_lib

ARGS = ("smoke",)
NORM_LAYERS = (0, 1, 2, 3)
DROPOUT_LAYERS = (1, 2, 3)  # Plus 0, which has no p.
DROPOUT_P = (0.2, 0.5, 0.8)
BATCH_SIZES = (64, 256)
EPOCHS = (200, 100)
SMOKE_EPOCHS = (2, 1)
# (norm_layers, dropout_layers, p, batch) of the smoke subset.
SMOKE_PICKS = ((0, 0, 0.0, 64), (1, 1, 0.8, 256), (2, 2, 0.2, 256),
               (3, 3, 0.5, 64))
NUM_VARIANTS = len(NORM_LAYERS) * (1 + len(DROPOUT_LAYERS) * len(
    DROPOUT_P)) * len(BATCH_SIZES)  # 80


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The S1 recipe (also the base of agc.py and augment.py)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  c = config_lib.base_config()
  c.name = "bn_dropout"
  c.dataset.name = "cifar10"
  c.model.name = "resnet50"
  c.model.norm = "batch"
  c.model.norm_layers = 3
  c.model.dropout_layers = 0
  c.model.dropout = 0.0
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule.name = "cosine"
  c.optimizer.schedule.warmup_epochs = 2.0
  c.augment = ""
  c.train.batch_size = BATCH_SIZES[0]
  c.train.epochs = EPOCHS[0]
  c.target_accuracy = 0.87
  if "smoke" in args:
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 8
    c.dataset.train_size = 512
    c.dataset.test_size = 256
    c.train.batch_size = BATCH_SIZES[0]
    c.train.epochs = SMOKE_EPOCHS[0]
    c.optimizer.schedule.warmup_epochs = 0.5
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The 80-variant grid (4 variants in smoke mode)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  smoke = "smoke" in args
  dropout = ([{"model.dropout_layers": 0, "model.dropout": 0.0}] +
             config_lib.product(model__dropout_layers=DROPOUT_LAYERS,
                                model__dropout=DROPOUT_P))
  grid = config_lib.combine(
      config_lib.product(model__norm_layers=NORM_LAYERS),
      dropout,
      config_lib.zip_axes(train__batch_size=BATCH_SIZES,
                          train__epochs=SMOKE_EPOCHS if smoke else EPOCHS))
  if smoke:
    grid = [v for v in grid
            if (v["model.norm_layers"], v["model.dropout_layers"],
                v["model.dropout"], v["train.batch_size"]) in SMOKE_PICKS]
  return grid


def get_report(arg: str | None = None) -> dict:
  """The report's heatmaps (S1's norm_layers x dropout_layers grid) and the
  baseline of its comparisons over seeds: the normalization- and
  dropout-free network, at each batch size (S1's grids are per batch)."""
  config_lib.parse_args(arg, ARGS, __file__)
  return {"heatmaps": [["model.norm_layers", "model.dropout_layers"]],
          "baseline": {"model.norm_layers": 0, "model.dropout_layers": 0},
          "baseline_within": ["train.batch_size"]}
