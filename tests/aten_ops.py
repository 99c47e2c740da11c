"""Which ATen ops a call dispatches: how tests check that work is fused (or skipped), not just correct."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def aten_ops(fn) -> list[str]:
    """The names of the ATen ops ``fn()`` dispatches, in order (``"mm"``, ``"addmm"``, ``"add"``, ...)."""
    with _Record() as record:
        fn()
    return record.ops
