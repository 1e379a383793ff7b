"""vaekit: a config-driven training CLI for variational autoencoders, and its Python API.

    import vaekit
    metrics = vaekit.train(["prior=vampprior"], run_dir="outputs/nb")
    run = vaekit.load_run("outputs/nb")

The public names are `train`, `load_run`, `evaluate` and `Run` (vaekit/api.py); everything
else is internal. They are imported on first use, so `import vaekit` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vaekit.api import Run, evaluate, load_run, train

__version__ = "0.1.0"
__all__ = ["Run", "evaluate", "load_run", "train"]


def __getattr__(name: str) -> Any:
    """vaekit.train and the other public names, from vaekit/api.py on first access."""
    if name in __all__:
        from vaekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
