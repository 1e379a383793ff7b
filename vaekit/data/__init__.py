"""The dataset group: one module per on-disk format, all returning `RawSplits`.

`vaekit.data.load_*` (digits, torchvision, cifar10, omniglot, image_folder, celeba64) are the
`_target_`s that dataset configs (and the configs saved in checkpoints) name; `DeviceData`
puts the splits on the device.
"""

from vaekit.data.cifar import load_cifar10
from vaekit.data.digits import load_digits
from vaekit.data.folder import load_celeba64, load_image_folder
from vaekit.data.idx import load_torchvision
from vaekit.data.memory import DeviceData, batches
from vaekit.data.omniglot import load_omniglot
from vaekit.data.splits import BINARIZE_SEED, RawSplits

__all__ = [
    "BINARIZE_SEED",
    "DeviceData",
    "RawSplits",
    "batches",
    "load_celeba64",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_omniglot",
    "load_torchvision",
]
