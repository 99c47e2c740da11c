"""When to launch Triton: CUDA tensors, a dtype the kernels handle, and an importable Triton."""

from __future__ import annotations

import functools
import importlib

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """Import Triton only when a CUDA kernel is about to run, never at package import."""
    try:
        importlib.import_module("triton.language")
    except Exception:  # noqa: BLE001 - any import failure means "use the PyTorch path"
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in TRITON_DTYPES for t in tensors) and triton_available()
