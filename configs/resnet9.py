"""Study S5: fast ResNet-9 (DavidNet) to 94% on CIFAR-10.

Source settings (studies.md, S5): ResNet-9 (`resnet9`: prep 64 -> layer1 128
+ residual -> layer2 256 -> layer3 512 + residual -> global max-pool ->
dense without bias, logits x 0.125; BN after every conv; ~6.57M
parameters), SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 512,
24 epochs, one-cycle piecewise-linear LR (0 -> peak at epoch 5 -> 0 at epoch
24), augmentation pad 4 (reflect) -> random crop -> flip -> cutout 8x8,
target 94% (reported: 94.1% in 20-24 epochs). Variants: the LR policy,

  onecycle     DavidNet's [0, 5, 24] epochs -> [0, 0.4, 0]
  triangular   Smith 2017 cycles between 0 and 0.4, half cycle 4 epochs
               (3 full cycles in 24 epochs, peaks at epochs 4, 12, 20)
  triangular2  the same, amplitude halved every cycle (0.4, 0.2, 0.1)
  exp_range    the same, amplitude x 0.999 per step (x ~0.1 by the end)

The learning rate. DavidNet sums the loss over the batch and steps with
lr = 0.4 / 512 and PyTorch weight_decay = 5e-4 * 512. Its update is then
(0.4 / 512) * (512 * mean-loss gradient + 5e-4 * 512 * w)
= 0.4 * (mean-loss gradient + 5e-4 * w): with jaxreg's mean loss and coupled
weight decay (added to the gradient before momentum, as PyTorch) that is
exactly optimizer.lr = 0.4 and optimizer.weight_decay = 5e-4.

Other choices:
  * Weight decay applies to every parameter (weight_decay_mask ""), BN scales
    and biases included, as DavidNet's PyTorch SGD over all trainable
    parameters did (jaxreg's default decays conv/dense kernels only: pass
    --config.optimizer.weight_decay_mask='(^|/)kernel$' for that).
  * BN: jaxreg's own, momentum 0.9 in the Flax convention (PyTorch's 0.1,
    DavidNet's), epsilon 1e-5. No label smoothing, dropout 0.
  * No validation split: DavidNet's "validation accuracy" is the CIFAR-10
    test set.
  * exp_range's gamma is per optimizer step: 0.999 over the 24 x 97 = 2328
    steps leaves ~10% of the amplitude at the end.

Run:
  python launch.py --config=configs/resnet9.py               # 4 LR policies
  python launch.py --config=configs/resnet9.py:smoke         # seconds, 2
S5's augmentation comparison is configs/augment.py:s5.

Args (after ':'):
  smoke  width 8 (channels 8..64), 512 training / 256 test images, batch
         128, 2 epochs, LR peak at epoch 0.5, half cycle 0.5 epochs;
         subset onecycle and exp_range.
"""
from __future__ import annotations

import ml_collections

from jaxreg import config as config_lib

ARGS = ("smoke",)
SCHEDULES = ("onecycle", "triangular", "triangular2", "exp_range")
SMOKE_SCHEDULES = ("onecycle", "exp_range")
AUGMENT = "pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DavidNet's recipe (also the base of augment.py:s5)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  c = config_lib.base_config()
  c.name = "resnet9"
  c.dataset.name = "cifar10"
  c.model.name = "resnet9"
  c.model.width = 64
  c.model.logit_scale = 0.125
  c.model.norm = "batch"
  c.model.dropout = 0.0
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.4
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decoupled_weight_decay = False
  c.optimizer.weight_decay_mask = ""
  c.optimizer.schedule.name = "onecycle"
  c.optimizer.schedule.peak_epoch = 5.0
  c.optimizer.schedule.half_cycle_epochs = 4.0
  c.optimizer.schedule.min_lr_fraction = 0.0
  c.optimizer.schedule.gamma = 0.999
  c.augment = AUGMENT
  c.train.batch_size = 512
  c.train.epochs = 24
  c.target_accuracy = 0.94
  if "smoke" in args:
    c.model.width = 8
    c.dataset.train_size = 512
    c.dataset.test_size = 256
    c.train.batch_size = 128
    c.train.epochs = 2
    c.optimizer.schedule.peak_epoch = 0.5
    c.optimizer.schedule.half_cycle_epochs = 0.5
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """One variant per LR policy (4; 2 in smoke mode)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  names = SMOKE_SCHEDULES if "smoke" in args else SCHEDULES
  return config_lib.product(optimizer__schedule__name=names)


def get_report(arg: str | None = None) -> dict:
  """The baseline of the comparisons over seeds: DavidNet's one-cycle
  schedule, against which S5 compares the cyclic policies."""
  config_lib.parse_args(arg, ARGS, __file__)
  return {"baseline": {"optimizer.schedule.name": "onecycle"}}
