"""Host syncs: where the parts may spend them, and a counter of the ones a GPU would see.

A host sync is an operation whose result the Python side must wait for: reading a tensor's
value (`.item()`, `bool(t)`, `float(t)`), or an op whose output shape depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`). On a GPU each one stalls the
queue of kernels. On the CPU it costs nothing, so iterative parts (the spherical rejection
sampler, flow inverses, the Sylvester orthogonalization) stop as soon as they converge there,
and run fixed, sync-free step counts on accelerators (`checks_are_free`).
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


_counters_active = 0  # SyncCounters entered and not yet left


def checks_are_free(x: torch.Tensor) -> bool:
    """True when reading back a value of `x` costs no stall: it lives on the CPU and no
    SyncCounter is measuring what the accelerator path would cost."""
    return x.device.type == "cpu" and _counters_active == 0


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts host-syncing ops by name while it is active.

    `with SyncCounter() as syncs: step()` then `syncs.total` and `syncs.by_op`
    (e.g. {"aten._local_scalar_dense.default": 3, "Tensor.tolist": 1}). Indexing with a boolean mask counts as
    `index(bool)`: it runs `nonzero` below the dispatcher. While it is active the parts take
    their accelerator path on the CPU too, so the count is what a GPU step would wait on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __enter__(self) -> SyncCounter:
        global _counters_active
        _counters_active += 1
        # tolist() reads a CPU tensor's memory without an ATen op (on a GPU it is a copy to
        # the host, a sync): counted by wrapping the method while the counter is active
        self._tolist = torch.Tensor.tolist
        counter, read = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            counter.by_op["Tensor.tolist"] += 1
            return read(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc_info: object) -> None:
        global _counters_active
        _counters_active -= 1
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc_info)

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
