"""Data augmentation inside the jitted train step, from a PRNG key.

The pipeline is one string, `config.augment`: ops separated by "|", each op
either `name` or `name(key=value, ...)` with Python literal values, e.g.
"pad_crop(pad=4,mode='reflect')|flip|cutout(size=8)". "" means none.

Contract:
  * `make_augment(spec, image_shape, num_classes)` parses the spec, resolves
    every op from the `AUGMENTS` registry and validates every option once,
    before anything is traced, and returns `fn(key, images, labels) ->
    (images, labels)`. Images are float32 [B, H, W, C] in [0, 1] (this runs
    before standardization); labels are float32 one-hot or soft [B, K].
  * Op number i draws from `jax.random.fold_in(key, i)`, so the output is a
    pure function of the key and an edit to one op does not reshuffle the
    randomness of the others. Every random choice is per example unless the
    op says otherwise (mixup draws one lambda per batch, as in the paper).
  * Shapes are static. Only `cutout_extra` changes the batch size (it
    appends n examples); `output_batch_size` says by how much, so the
    caller can size buffers at build time.

At evaluation, `tta_logits` averages a model's logits over test-time views
(`config.train.tta`, one of `config.TTA_MODES`).

Modules, in import order: `spec` (parsing, option checks), `base` (the `Op`
interface, the registry), the ops by kind (`geometric`, `erasing`, `mixing`,
`filters`), `pipeline` (building the function), `tta` (test-time views).
"""
from jaxreg.augment.base import AUGMENTS, Array, AugmentFn, Op, register
from jaxreg.augment.erasing import Cutout, CutoutExtra, RandomErasing
from jaxreg.augment.filters import Blur
from jaxreg.augment.geometric import Flip, PadCrop, Rotate
from jaxreg.augment.mixing import Mixup
from jaxreg.augment.pipeline import available, make_augment, output_batch_size
from jaxreg.augment.spec import parse
from jaxreg.augment.tta import tta_logits

__all__ = [
    "AUGMENTS", "Array", "AugmentFn", "Blur", "Cutout", "CutoutExtra", "Flip",
    "Mixup", "Op", "PadCrop", "RandomErasing", "Rotate", "available",
    "make_augment", "output_batch_size", "parse", "register", "tta_logits",
]
