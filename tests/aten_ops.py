"""Which ATen ops a call dispatches: how tests check that work is fused (or skipped), not just correct."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((str(func.overloadpacket.__name__), shape))
        return out


# Ops that only reinterpret a tensor's metadata (no pass over its memory).
VIEW_OPS = frozenset({"view", "_unsafe_view", "reshape", "t", "permute", "transpose", "expand", "alias", "detach",
                      "unsqueeze", "squeeze", "select", "slice", "as_strided"})


def aten_calls(fn, views: bool = True) -> list[tuple[str, tuple[int, ...] | None]]:
    """``(op name, output shape)`` of every ATen op ``fn()`` dispatches, in order (shape None: not one tensor);
    ``views=False`` leaves out the metadata-only ops (``VIEW_OPS``)."""
    with _Record() as record:
        fn()
    return [call for call in record.calls if views or call[0] not in VIEW_OPS]


def aten_ops(fn) -> list[str]:
    """The names of the ATen ops ``fn()`` dispatches, in order (``"mm"``, ``"addmm"``, ``"add"``, ...)."""
    return [name for name, _ in aten_calls(fn)]
