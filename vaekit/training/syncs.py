"""Count the host syncs a piece of code would cost on a GPU, on any device (the CPU included).

A host sync is an operation whose result the Python side must wait for: reading a tensor's
value (`.item()`, `bool(t)`, `float(t)`), or an op whose output shape depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`). On a GPU each one stalls the
queue of kernels; on the CPU they are free, so they go unnoticed unless counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that read a value back or size their output by the data.
SYNCING_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten._unique2.default",
        "aten.unique_consecutive.default",
        "aten.unique_dim.default",
        "aten.is_nonzero.default",
    }
)


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts host-syncing ops by name while it is active.

    `with SyncCounter() as syncs: step()` then `syncs.total` and `syncs.by_op`
    (e.g. {"aten._local_scalar_dense.default": 3}). Indexing with a boolean mask counts as
    `index(bool)`: it runs `nonzero` below the dispatcher.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Number of host syncs counted."""
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name in SYNCING_OPS:
            self.by_op[name] += 1
        elif name.startswith("aten.index.Tensor") and _has_bool_index(args):
            self.by_op["index(bool)"] += 1
        return func(*args, **(kwargs or {}))
