"""Study S4: six normalizations on a CIFAR ResNet 6n+2 (n=2, 14 layers).

Source settings (studies.md, S4): CIFAR-10, `cifar_resnet` depth 14 (widths
16/32/64), SGD lr 0.1 with momentum 0.9, batch 128, 100 epochs, cosine
annealing, augmentation pad 4 -> random crop 32 -> horizontal flip, a
validation split held out of the training set, accuracy / micro F1 / macro
F1 on train, val and test, and the 1st/20th/80th/99th percentiles of one
layer's features tracked every epoch. Seven variants (default arg):

  batch           own BatchNorm (reported 89.14)
  batch_flax      Flax's built-in nn.BatchNorm (89.57)
  instance        (87.21)
  batch_instance  Nam & Kim 2018, gate rho starts at 1 (87.65)
  layer           over (C, H, W) (87.11)
  group           8 groups (86.84)
  none            identity (86.77)

Choices made here, where S4 is silent:
  * val_fraction 0.1: 5,000 of the 50,000 training images are held out
    (seeded by dataset.split_seed), so training sees 45,000.
  * Padding for the crop is zeros ("constant"), as torchvision's
    RandomCrop(32, padding=4); it is applied to [0, 1] images before
    standardization, so the border is black.
  * Cosine from 0.1 to 0 over the whole run, no warmup.
  * Weight decay 1e-4, coupled, on conv/dense kernels only: the recipe of He
    et al. 2016 for this architecture family (set
    --config.optimizer.weight_decay=0 to drop it).
  * group: 8 groups (2/4/8 channels per group in the 16/32/64 stages; 32
    groups as in Wu & He 2018 do not divide 16 channels). The count is a
    per-variant override because the other norms refuse the option.
  * BatchNorm running statistics: momentum 0.9 in the Flax convention
    (PyTorch's 0.1), the same for own and built-in BN so the two can agree.
  * Feature quantiles: `stage3_block1/norm2`, the normalized output of the
    first block of the last stage (for `none` it is the identity, i.e. the
    conv output), a path that exists at depth 14 and at the smoke depth 8.
  * target_accuracy 0.85, below every reported S4 accuracy, so the time to
    target compares every norm.

Run:
  python launch.py --config=configs/norms.py               # the 7 norms
  python launch.py --config=configs/norms.py:step          # 7, step decay
  python launch.py --config=configs/norms.py:noaug         # 7, no augmentation
  python launch.py --config=configs/norms.py:smoke         # seconds, 4 norms

Args (after ':'; combine with ',', e.g. ':step,noaug' or ':noaug,smoke'):
  step   step decay instead of cosine: lr x 0.1 every 30 epochs (0.1, 0.01
         at 30, 1e-3 at 60, 1e-4 at 90). Each variant carries
         optimizer.schedule.name=step, so its name differs from the cosine
         run's and both can share one workdir.
  noaug  no augmentation (each variant carries augment=""). The reported
         81.91 is its norm=batch_flax variant.
  smoke  depth 8, 512 training / 256 test / 500 validation images, 2
         epochs (step decay every epoch): the representative subset batch,
         batch_instance, group, none.
BatchNorm vs GroupNorm at batch 8 is configs/batch_size.py.
"""
from __future__ import annotations

import ml_collections

from jaxreg import config as config_lib

ARGS = ("step", "noaug", "smoke")
NORMS = ("batch", "batch_flax", "instance", "batch_instance", "layer",
         "group", "none")
SMOKE_NORMS = ("batch", "batch_instance", "group", "none")
GROUPS = 8
AUGMENT = "pad_crop(pad=4,mode='constant')|flip"
FEATURE_LAYER = "stage3_block1/norm2"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The S4 recipe shared by every variant (also used by batch_size.py)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  c = config_lib.base_config()
  c.name = "norms"
  c.dataset.name = "cifar10"
  c.dataset.val_fraction = 0.1
  c.model.name = "cifar_resnet"
  c.model.depth = 14
  c.model.norm = "batch"
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.name = "cosine"
  # Used by the `step` variants only.
  c.optimizer.schedule.decay_epochs = 30.0
  c.optimizer.schedule.decay_factor = 0.1
  c.augment = AUGMENT
  c.train.batch_size = 128
  c.train.epochs = 100
  c.train.feature_layer = FEATURE_LAYER
  c.target_accuracy = 0.85
  if "smoke" in args:
    c.model.depth = 8
    c.dataset.train_size = 512
    c.dataset.test_size = 256
    c.dataset.val_fraction = 0.01
    c.train.epochs = 2
    c.optimizer.schedule.decay_epochs = 1.0
  return c


def norm_variant(norm: str) -> dict:
  """Overrides selecting one norm, with the options only it takes."""
  v = {"model.norm": norm}
  if norm == "group":
    v["model.norm_kwargs.num_groups"] = GROUPS
  return v


def get_sweep(arg: str | None = None) -> list[dict]:
  """One variant per norm (7; 4 in smoke mode)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  recipe = {}
  if "step" in args:
    recipe["optimizer.schedule.name"] = "step"
  if "noaug" in args:
    recipe["augment"] = ""
  norms = SMOKE_NORMS if "smoke" in args else NORMS
  return [{**norm_variant(n), **recipe} for n in norms]


def get_report(arg: str | None = None) -> dict:
  """The baseline of the comparisons over seeds: jaxreg's own BatchNorm
  (S4's reference; the built-in one must agree with it)."""
  config_lib.parse_args(arg, ARGS, __file__)
  return {"baseline": {"model.norm": "batch"}}
