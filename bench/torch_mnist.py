"""The S3 network and training loop in plain PyTorch, for bench/mnist_epoch.py.

Benchmark only: PyTorch is not a jaxreg dependency. Install a CPU build into
the same environment with

  pip install torch==2.13.0          # (add --index-url
                                     # https://download.pytorch.org/whl/cpu
                                     # where the default wheel is CUDA's)

Without torch, this script and mnist_epoch.py's PyTorch rows are skipped with
a message saying so.

The network is built from jaxreg.models.MnistCNN's own `layout`, so it has
the same layers, widths and order (conv 3x3 without bias -> ReLU -> dropout
-> BatchNorm; 1x1 transition convs each before a 2x2 max-pool; global
average pool; Dense `classifier`), and the parameter count is asserted equal
to jaxreg's. The loop is the plain one: a DataLoader over in-memory float32
tensors (standardized once, shuffled, batch 128, the last partial batch
dropped as jaxreg does), SGD lr 0.04 momentum 0.9, cross-entropy.

  python bench/torch_mnist.py --epochs=4     # first epoch, then steady ones
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position


_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs (the first is reported "
                               "apart, the median of the others as steady).")


def build_net(config) -> Any:
  """torch.nn.Sequential equal to models.build_model(config.model) for the
  mnist_cnn model with norm "batch" (or "none")."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  from jaxreg import models  # pylint: disable=g-import-not-at-top
  mc = config.model
  if mc.name != "mnist_cnn" or mc.norm not in ("batch", "batch_flax", "none"):
    raise ValueError(f"the PyTorch twin covers mnist_cnn with batch norm or "
                     f"none, not {mc.name}/{mc.norm}")
  kw = mc.norm_kwargs
  momentum = 0.9 if kw.momentum is None else kw.momentum
  eps = 1e-5 if kw.epsilon is None else kw.epsilon
  layers, channels = [], 1
  for tag, features, padding in models.MnistCNN.layout:
    if tag == "pool":
      layers += [nn.Conv2d(channels, features, 1, bias=False),
                 nn.MaxPool2d(2, 2)]
    else:
      layers += [nn.Conv2d(channels, features, 3, bias=False,
                           padding=0 if padding == "VALID" else 1),
                 nn.ReLU()]
      if mc.dropout > 0:
        layers.append(nn.Dropout(mc.dropout))
      if mc.norm != "none":
        # Flax's momentum m is PyTorch's 1 - m.
        layers.append(nn.BatchNorm2d(features, eps=eps, momentum=1 - momentum))
    channels = features
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
  del torch
  return nn.Sequential(*layers)


def check_param_count(net, config) -> int:
  from jaxreg import models  # pylint: disable=g-import-not-at-top
  n_torch = sum(p.numel() for p in net.parameters())
  n_jax = models.count_params(models.build_model(config.model, 10),
                              (28, 28, 1))
  if n_torch != n_jax:
    raise AssertionError(f"PyTorch twin has {n_torch} parameters, jaxreg's "
                         f"mnist_cnn {n_jax}: the architectures differ")
  return n_torch


class TorchLoop:
  """A plain PyTorch epoch over MNIST held in memory as float32 tensors."""

  def __init__(self, config, ds, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.utils import data as tdata  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    self.torch = torch
    self.net = build_net(config)
    self.num_params = check_param_count(self.net, config)
    x = (ds.train_images.astype("float32") / 255.0 - ds.mean) / ds.std
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW
    y = torch.from_numpy(ds.train_labels.astype("int64"))
    bs = config.train.batch_size
    self.loader = tdata.DataLoader(tdata.TensorDataset(x, y), batch_size=bs,
                                   shuffle=True, drop_last=True)
    self.steps_per_epoch = len(self.loader)
    self.batch_size = bs
    o = config.optimizer
    self.opt = torch.optim.SGD(self.net.parameters(), lr=o.lr,
                               momentum=o.momentum)
    self.loss_fn = torch.nn.CrossEntropyLoss()

  # The interface of benchlib.time_epochs (nothing to compile).
  def init_state(self, seed: int = 0):
    return None

  def compile(self, state, key) -> float:
    return 0.0

  def epoch(self, state, epoch: int, key):
    del epoch, key
    self.net.train()
    total = self.torch.zeros(())
    for xb, yb in self.loader:
      self.opt.zero_grad(set_to_none=True)
      loss = self.loss_fn(self.net(xb), yb)
      loss.backward()
      self.opt.step()
      total += loss.detach()
    return state, float(total) / self.steps_per_epoch


def epoch_times(loop: TorchLoop, epochs: int) -> Iterator[float]:
  for e in range(epochs):
    t0 = time.perf_counter()
    loop.epoch(None, e, None)
    yield time.perf_counter() - t0


def main(argv):
  del argv
  if not benchlib.torch_available():
    print(f"SKIPPED: {benchlib.TORCH_INSTALL_HINT}")
    return
  import torch  # pylint: disable=g-import-not-at-top
  from jaxreg import data as data_lib  # pylint: disable=g-import-not-at-top
  config = benchlib.mnist_config()
  ds = data_lib.load(config.dataset)
  loop = TorchLoop(config, ds)
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{loop.num_params} parameters, {loop.steps_per_epoch} steps/epoch")
  times = []
  for i, dt in enumerate(epoch_times(loop, _EPOCHS.value)):
    times.append(dt)
    print(f"epoch {i + 1}: {dt:.2f} s (load {benchlib.load_avg():.2f})")
  steady = benchlib.median(times[1:]) if len(times) > 1 else float("nan")
  benchlib.print_table(
      ["loop", "first epoch s", "steady epoch s", "img/s"],
      [["PyTorch", times[0], steady,
        loop.steps_per_epoch * loop.batch_size / steady]],
      "S3 on MNIST, plain PyTorch loop")


if __name__ == "__main__":
  app.run(main)
