"""`trainer.deterministic=true`: the settings under which a GPU run repeats bit for bit.

On the CPU, vaekit's runs repeat bitwise anyway. On a GPU, cuDNN may pick nondeterministic
convolution algorithms, TF32 rounds matmuls differently from float32, and cuBLAS reductions
depend on its workspace: this turns each of those off, and asks torch for deterministic
kernels (warning once per op that has none, instead of failing).
"""

from __future__ import annotations

import os
import warnings

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic reductions (CUDA >= 10.2)


def make_deterministic() -> None:
    """Deterministic algorithms, TF32 off, cuDNN autotuning off; must run before the first
    GPU kernel (cuBLAS reads its workspace setting when it starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # torch names the op in its message; one warning per op is enough
    warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
