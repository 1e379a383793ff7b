"""The dataset group: one module per on-disk format, all returning `RawSplits`.

`vaekit.data.load_digits` and `vaekit.data.load_torchvision` are the `_target_`s that dataset
configs (and the configs saved in checkpoints) name; `DeviceData` puts the splits on the device.
"""

from vaekit.data.digits import load_digits
from vaekit.data.idx import load_torchvision
from vaekit.data.memory import DeviceData, batches
from vaekit.data.splits import BINARIZE_SEED, RawSplits

__all__ = ["BINARIZE_SEED", "DeviceData", "RawSplits", "batches", "load_digits", "load_torchvision"]
