"""Averaging over data-parallel replicas for the quantities a method computes outside DDP's backward.

DDP averages the gradients of the loss it sees. The extra passes some methods run by themselves —
AutoLoRA's held-out hypergradient, HeteroLoRA's re-scoring passes — see only the replica's own
batch, so without help every replica would take its own decision (β, allocation). Reducing their
results over the replicas (one collective) gives every replica the same value, and for mean losses
over equal-sized local batches it is the value one process computes on the concatenated batches.
Outside ``torch.distributed`` (or with one process) everything is returned unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def distributed_active() -> bool:
    """Whether ``torch.distributed`` is available and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of replicas (1 when ``torch.distributed`` is not initialised)."""
    return torch.distributed.get_world_size() if distributed_active() else 1


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, e.g. an FSDP2 (``fully_shard``) parameter shard outside forward."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def fsdp_kind(tensor: torch.Tensor) -> Optional[str]:
    """Which FSDP manages parameter ``tensor``, for error messages: FSDP2 (a DTensor shard), FSDP1
    (an original parameter flattened into a ``FlatParameter``, a 1-D view of the local shard outside
    forward), or None."""
    if is_sharded(tensor):
        return "FSDP2 (fully_shard)"
    if getattr(tensor, "_fsdp_flattened", False):  # set by FSDP1 on the parameters it flattens
        return "FSDP1 (FullyShardedDataParallel)"
    return None


def fsdp_model_holding(model: Optional[torch.nn.Module], root: torch.nn.Module) -> Optional[torch.nn.Module]:
    """``model`` if it is an FSDP model (a ``fully_shard`` module or an FSDP1 wrapper) with ``root`` among its
    modules, else None: the module a per-step pass must go through under FSDP, whose root unit gathers the
    embeddings and head in its forward."""
    if model is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, (FSDPModule, FullyShardedDataParallel)) and any(m is root for m in model.modules()):
        return model
    return None


def fsdp1_whole(module: torch.nn.Module, tensors, writeback: bool = False, with_grads: bool = False):
    """A context in which FSDP1's flat slices of ``tensors`` (parameters inside ``module``) are whole again
    (``summon_full_params``, with their gradients if ``with_grads``); a no-op when none is FSDP1-managed.
    A collective: every rank must enter it together."""
    if any(fsdp_kind(t) == "FSDP1 (FullyShardedDataParallel)" for t in tensors):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(module, writeback=writeback, with_grads=with_grads)
    return contextlib.nullcontext()


def deepspeed_managed(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a DeepSpeed ZeRO engine (ZeRO-3: partitioned, ``ds_id``; ZeRO-1/2: linked
    to its fp32 partition, ``_hp_mapping``)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def replica_reduce(tensors: list[Optional[torch.Tensor]], op: str = "mean") -> list[Optional[torch.Tensor]]:
    """Sum or mean (``op``) of each tensor over all replicas, in one all-reduce; ``None`` entries stay ``None``.

    Every replica must call this with tensors of the same shapes in the same order (as DDP does for
    its gradient buckets). The reduction runs in float64 and the results keep their dtype.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"op={op!r} is not allowed; use 'mean' or 'sum'")
    world = world_size()
    present = [t for t in tensors if t is not None]
    if world == 1 or not present:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in present])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    if op == "mean":
        flat /= world
    out, start = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out
