"""What jaxreg knows of the datasets it is tested with, without TFDS: the
official files each is prepared from, and the shape of what `load` returns."""
from __future__ import annotations

# The files TFDS expects in a manual directory, as their publishers name them,
# so a missing dataset can be refused with the exact list of what to fetch.
# (TFDS's own checksums list, builder.url_infos, is preferred where present.)
OFFICIAL_FILES = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "fashion_mnist": ("train-images-idx3-ubyte.gz",
                      "train-labels-idx1-ubyte.gz",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "cifar10": ("cifar-10-binary.tar.gz",),
    "cifar100": ("cifar-100-binary.tar.gz",),
    "svhn_cropped": ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
}

# (image shape HWC, number of classes) of each, as `load` returns them; the
# same as the TFDS builders' `info.features` ("image", "label").
SHAPES = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
}
