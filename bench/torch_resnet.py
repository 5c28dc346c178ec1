"""PyTorch twins of jaxreg's cifar_resnet and resnet9, for bench/resnet_epoch.py.

Benchmark only: PyTorch is not a jaxreg dependency (install as
bench/torch_mnist.py says; without it the PyTorch rows are skipped).

The networks follow jaxreg.models.resnets layer by layer, and their
parameter counts are asserted equal to jaxreg's:

  cifar_resnet  3x3 stem conv (16, no bias) -> BN -> ReLU; n basic blocks
                per stage (16/32/64 channels, stride 2 entering stages 2
                and 3): conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + option A
                shortcut (x[:, :, ::2, ::2] plus zero channels), ReLU;
                global average pool; Linear `classifier`.
  resnet9       DavidNet: conv3x3 (no bias) -> BN -> ReLU [-> 2x2 max-pool]
                units, residual pairs after layer1 and layer3, global max
                pool, Linear without bias, logits x logit_scale.

Initialisation as Flax's defaults (LeCun normal, truncated, for conv and
linear kernels; zero biases; BN scale 1, bias 0); BN momentum 1 - jaxreg's
(0.1) and the same epsilon. The recipe is the study's: SGD with its
momentum (Nesterov where set), coupled weight decay on the parameters the
config's mask selects (S4: conv/linear kernels; S5: every parameter), the
learning rate of jaxreg's own schedule at every step, cross-entropy with
the config's label smoothing. Data: the training split in memory as a uint8
tensor; each step gathers its batch from a fresh permutation, converts to
[0, 1], applies the study's augmentation batched in PyTorch (pad 4, constant
or reflect, random crop, horizontal flip, cutout), then standardizes, as
jaxreg does inside its step. `channels_last=True` runs the network and its
input in PyTorch's NHWC memory format.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np



def _lecun_normal_(w) -> None:
  """Flax's lecun_normal: truncated normal (at 2 std) with variance
  1/fan_in; PyTorch's OIHW / (out, in) weights have fan_in = numel/out."""
  import torch  # pylint: disable=g-import-not-at-top
  fan_in = w[0].numel()
  # The std of a standard normal truncated to [-2, 2].
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  with torch.no_grad():
    torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def build_net(model_cfg, num_classes: int, in_channels: int) -> Any:
  """The PyTorch twin of models.build_model(model_cfg, num_classes) for
  cifar_resnet and resnet9 with norm "batch" (or "batch_flax") on images
  of `in_channels` channels."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  mc = model_cfg
  if mc.norm not in ("batch", "batch_flax") or mc.dropout:
    raise ValueError(f"the PyTorch twin covers batch norm without dropout, "
                     f"not norm={mc.norm}, dropout={mc.dropout}")
  kw = mc.norm_kwargs
  momentum = 0.9 if kw.momentum is None else kw.momentum
  eps = 1e-5 if kw.epsilon is None else kw.epsilon
  # Flax's momentum m is PyTorch's 1 - m.
  bn = lambda c: nn.BatchNorm2d(c, eps=eps, momentum=1 - momentum)
  conv = lambda cin, cout, stride=1: nn.Conv2d(cin, cout, 3, stride, 1,
                                               bias=False)

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.norm1 = conv(cin, cout, stride), bn(cout)
      self.conv2, self.norm2 = conv(cout, cout), bn(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.norm1(self.conv1(x)))
      y = self.norm2(self.conv2(y))
      s = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
      if self.extra:
        s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
      return F.relu(y + s)

  class CifarResNet(nn.Module):

    def __init__(self, depth):
      super().__init__()
      n = (depth - 2) // 6
      self.stem = nn.Sequential(conv(in_channels, 16), bn(16),
                                nn.ReLU())
      blocks, cin = [], 16
      for stage in range(3):
        for b in range(n):
          cout = 16 * 2**stage
          blocks.append(Block(cin, cout, 2 if stage and not b else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
      x = self.blocks(self.stem(x))
      return self.classifier(x.mean((2, 3)))

  def unit(cin, cout, pool=False):
    layers = [conv(cin, cout), bn(cout), nn.ReLU()]
    if pool:
      layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)

  class Residual(nn.Module):

    def __init__(self, c):
      super().__init__()
      self.body = nn.Sequential(unit(c, c), unit(c, c))

    def forward(self, x):
      return x + self.body(x)

  class ResNet9(nn.Module):

    def __init__(self, w, scale):
      super().__init__()
      self.net = nn.Sequential(
          unit(in_channels, w), unit(w, 2 * w, True), Residual(2 * w),
          unit(2 * w, 4 * w, True), unit(4 * w, 8 * w, True),
          Residual(8 * w))
      self.classifier = nn.Linear(8 * w, num_classes, bias=False)
      self.scale = scale

    def forward(self, x):
      x = torch.amax(self.net(x), dim=(2, 3))
      return self.classifier(x) * self.scale

  if mc.name == "cifar_resnet":
    net = CifarResNet(int(mc.depth))
  elif mc.name == "resnet9":
    net = ResNet9(int(mc.width), float(mc.logit_scale))
  else:
    raise ValueError(f"no PyTorch twin of {mc.name}; valid choices: "
                     "cifar_resnet, resnet9")
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      _lecun_normal_(m.weight)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
  return net


def check_param_count(net, model_cfg, image_shape) -> int:
  from jaxreg import models  # pylint: disable=g-import-not-at-top
  n_torch = sum(p.numel() for p in net.parameters())
  n_jax = models.count_params(models.build_model(model_cfg, 10),
                              tuple(image_shape))
  if n_torch != n_jax:
    raise AssertionError(f"PyTorch twin has {n_torch} parameters, jaxreg's "
                         f"{model_cfg.name} {n_jax}: the architectures "
                         "differ")
  return n_torch


def _augment_spec(pipeline: str) -> dict:
  """The ops of an augmentation pipeline string this twin can run."""
  spec = {}
  for op in filter(None, (p.strip() for p in pipeline.split("|"))):
    name = op.split("(")[0]
    args = dict(re.findall(r"(\w+)=['\"]?(\w+)['\"]?", op))
    if name == "pad_crop":
      spec["pad"] = int(args.get("pad", 4))
      spec["mode"] = args.get("mode", "constant")
    elif name == "flip":
      spec["flip"] = True
    elif name == "cutout":
      spec["cutout"] = int(args.get("size", 8))
    else:
      raise ValueError(f"the PyTorch twin has no augmentation {name!r}; "
                       "valid choices: pad_crop, flip, cutout")
  return spec


class TorchLoop:
  """A PyTorch epoch of the study's recipe (module docstring)."""

  def __init__(self, config, ds, *, channels_last: bool, seed: int = 0,
               threads: int = 2):
    import torch  # pylint: disable=g-import-not-at-top
    from jaxreg import optim  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    self.torch = torch
    mc = config.model
    self.net = build_net(mc, ds.num_classes, ds.image_shape[-1])
    self.num_params = check_param_count(self.net, mc, ds.image_shape)
    self.fmt = (torch.channels_last if channels_last
                else torch.contiguous_format)
    self.net = self.net.to(memory_format=self.fmt)
    self.images = torch.from_numpy(
        np.ascontiguousarray(ds.train_images.transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(ds.train_labels.astype(np.int64))
    c = ds.image_shape[-1]
    self.mean = torch.tensor(ds.mean, dtype=torch.float32).view(1, c, 1, 1)
    self.std = torch.tensor(ds.std, dtype=torch.float32).view(1, c, 1, 1)
    self.batch_size = bs = config.train.batch_size
    self.steps_per_epoch = len(ds.train_labels) // bs
    self.aug = _augment_spec(config.augment)
    o = config.optimizer
    mask = re.compile(o.weight_decay_mask) if o.weight_decay_mask else None
    decay, rest = [], []
    for name, p in self.net.named_parameters():
      # jaxreg's paths end in /kernel for conv and linear weights.
      path = name.replace(".weight", "/kernel" if p.ndim > 1 else "/scale")
      (decay if mask is None or mask.search(path) else rest).append(p)
    self.opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": rest, "weight_decay": 0.0}], lr=o.lr,
        momentum=o.momentum, nesterov=bool(o.nesterov))
    sched = optim.lr_schedule(o, self.steps_per_epoch, config.train.epochs)
    self.lr = np.asarray(sched(np.arange(self.steps_per_epoch *
                                         config.train.epochs)))
    self.step = 0
    self.loss_fn = torch.nn.CrossEntropyLoss(
        label_smoothing=float(config.train.label_smoothing))

  def _batch(self, idx):
    torch = self.torch
    x = self.images[idx].float() / 255.0
    n, _, h, w = x.shape
    a = self.aug
    if "pad" in a:
      p = a["pad"]
      mode = "reflect" if a["mode"] == "reflect" else "constant"
      xp = torch.nn.functional.pad(x, (p, p, p, p), mode=mode)
      oy = torch.randint(0, 2 * p + 1, (n, 1, 1))
      ox = torch.randint(0, 2 * p + 1, (n, 1, 1))
      rows = oy + torch.arange(h).view(1, h, 1)
      cols = ox + torch.arange(w).view(1, 1, w)
      x = xp[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if a.get("flip"):
      flip = torch.rand(n, 1, 1, 1) < 0.5
      x = torch.where(flip, x.flip(3), x)
    if "cutout" in a:
      s = a["cutout"]
      cy = torch.randint(0, h, (n, 1, 1, 1))
      cx = torch.randint(0, w, (n, 1, 1, 1))
      ys = torch.arange(h).view(1, 1, h, 1)
      xs = torch.arange(w).view(1, 1, 1, w)
      # jaxreg's cutout: rows and cols [c - s//2, c - s//2 + s), clipped.
      top, left = cy - s // 2, cx - s // 2
      box = ((ys >= top) & (ys < top + s) & (xs >= left) & (xs < left + s))
      x = x.masked_fill(box, 0.0)
    x = (x - self.mean) / self.std
    return x.contiguous(memory_format=self.fmt), self.labels[idx]

  # The interface of benchlib.time_epochs (nothing to compile).
  def init_state(self, seed: int = 0):
    return None

  def compile(self, state, key) -> float:
    return 0.0

  def epoch(self, state, epoch: int, key):
    del epoch, key
    torch = self.torch
    self.net.train()
    perm = torch.randperm(len(self.labels))
    total = torch.zeros(())
    bs = self.batch_size
    for i in range(self.steps_per_epoch):
      for g in self.opt.param_groups:
        g["lr"] = float(self.lr[self.step % len(self.lr)])
      xb, yb = self._batch(perm[i * bs:(i + 1) * bs])
      self.opt.zero_grad(set_to_none=True)
      loss = self.loss_fn(self.net(xb), yb)
      loss.backward()
      self.opt.step()
      total += loss.detach()
      self.step += 1
    return state, float(total) / self.steps_per_epoch
