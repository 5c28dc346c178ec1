"""Study S2: adaptive gradient clipping (AGC) as a BatchNorm replacement.

Source settings (studies.md, S2): the normalization-free ResNet-50 of S1
(`resnet50` with norm_layers=0: no norm anywhere), dropout p 0.2 in the
first dropout_layers slots of every bottleneck, and AGC (Brock et al. 2021:
per output unit, G <- c * max(|W|, eps) / |G| * G when |G| / max(|W|, eps) >
c, eps 1e-3, the classifier not clipped). Screening grid, one epoch each:

  dropout_layers 0, 1, 2, 3
  agc_clip c     0.01, 0.02, 0.04, 0.08, 0.16, 0.32
  batch          64, 128, 256

4 x 6 x 3 = 72 variants; then (arg `full`) full runs with the chosen clip at
batch 256. Reported: the clip value barely changes training time, larger
batches train faster; AGC reaches about the accuracy of no normalization,
below BN.

Choices made here, where S2 is silent:
  * The optimizer is S1's (configs/bn_dropout.py, loaded from this
    directory): SGD lr 0.1, momentum 0.9, cosine to 0, no weight decay, no
    augmentation, target 87%. The full runs therefore compare directly with
    bn_dropout.py's batch-256 runs at norm_layers=0 (no normalization, no
    AGC) and norm_layers>0 (BN).
  * The one-epoch screen has no warmup (a warmup would fill most of the
    epoch); the cosine still decays to 0 within the epoch. The full runs
    keep S1's 2-epoch warmup and 100 epochs (S1's length at batch 256).
  * Full runs default to c = 0.08 (mid-grid; Brock et al. found small
    thresholds such as 0.01 best only at batch 4096, larger ones tolerable at
    small batches). Choose it from the screen and pass it on the command
    line: --config.optimizer.agc_clip=0.04 (the full variants do not
    override it). Use one workdir per clip value: a finished run refuses to
    be mixed with a different config.

Run:
  python launch.py --config=configs/agc.py                 # 72 screening runs
  python launch.py --config=configs/agc.py:full \
      --config.optimizer.agc_clip=0.04 \
      --workdir=results/agc_full_c0.04                     # 4 full runs
  python launch.py --config=configs/agc.py:smoke           # seconds, 3

Args (after ':'; combine with ',', e.g. ':full,nf' or ':full,smoke'):
  full   dropout_layers 0..3 at batch 256, 100 epochs, clip from
         optimizer.agc_clip (default 0.08): 4 variants.
  nf     the NF-ResNet-50 (`nf_resnet`: scaled weight standardization,
         SkipInit, Brock et al. 2021a) instead of resnet50 with
         norm_layers=0; every variant carries model.name=nf_resnet.
  smoke  stage_sizes (1,1,1,1), width 8, 512 training / 256 test images,
         1 epoch (full: 2 epochs, 0.5-epoch warmup); screen subset of 3
         (dropout_layers 0 / c 0.01 / batch 64, 2 / 0.08 / 128, 3 / 0.32 /
         256), full subset dropout_layers 0 and 2.
"""
from __future__ import annotations


import ml_collections

from jaxreg import config as config_lib

ARGS = ("full", "nf", "smoke")
DROPOUT_LAYERS = (0, 1, 2, 3)
CLIPS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
BATCH_SIZES = (64, 128, 256)
FULL_CLIP = 0.08
FULL_BATCH = 256
FULL_EPOCHS = 100
SMOKE_PICKS = ((0, 0.01, 64), (2, 0.08, 128), (3, 0.32, 256))
SMOKE_FULL_DROPOUT_LAYERS = (0, 2)
NUM_VARIANTS = len(DROPOUT_LAYERS) * len(CLIPS) * len(BATCH_SIZES)  # 72


def _s1_module():
  return config_lib.sibling(__file__, "bn_dropout.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """S1's recipe on the normalization-free ResNet-50, with AGC."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  smoke = "smoke" in args
  c = _s1_module().get_config("smoke" if smoke else None)
  c.name = "agc"
  c.model.name = "nf_resnet" if "nf" in args else "resnet50"
  c.model.norm_layers = 0
  c.model.dropout = 0.2
  c.model.dropout_layers = 0
  c.optimizer.agc_clip = FULL_CLIP
  if "full" in args:
    c.train.batch_size = FULL_BATCH
    c.train.epochs = 2 if smoke else FULL_EPOCHS
  else:
    c.train.batch_size = BATCH_SIZES[0]
    c.train.epochs = 1
    c.optimizer.schedule.warmup_epochs = 0.0
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """72 one-epoch screening variants, or 4 full runs (`full`)."""
  args = config_lib.parse_args(arg, ARGS, __file__)
  smoke = "smoke" in args
  model = [{"model.name": "nf_resnet"}] if "nf" in args else [{}]
  if "full" in args:
    layers = SMOKE_FULL_DROPOUT_LAYERS if smoke else DROPOUT_LAYERS
    return config_lib.combine(
        model, config_lib.product(model__dropout_layers=layers))
  grid = config_lib.combine(model, config_lib.product(
      model__dropout_layers=DROPOUT_LAYERS, optimizer__agc_clip=CLIPS,
      train__batch_size=BATCH_SIZES))
  if smoke:
    grid = [v for v in grid
            if (v["model.dropout_layers"], v["optimizer.agc_clip"],
                v["train.batch_size"]) in SMOKE_PICKS]
  return grid


def get_report(arg: str | None = None) -> dict:
  """The report's heatmaps: batch x clip value (S2's findings are about
  both), one row per dropout_layers. The `full` runs vary neither, so they
  draw none."""
  config_lib.parse_args(arg, ARGS, __file__)
  return {"heatmaps": [["train.batch_size", "optimizer.agc_clip"]]}
