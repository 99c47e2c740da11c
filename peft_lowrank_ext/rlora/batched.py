"""Generate the factors of every RLoRA layer in a few grouped launches per forward pass.

PEFT calls each tuner layer separately, which would mean one projection launch per module. A
forward pre-hook on the adapted model instead projects all active adapters at once (one launch
chain per distinct Hadamard length, with the random factors stacked once per group and reused:
``kernels.fastfood.StackedFastfood``) and hands each layer its (A, B) for this pass. Layers with noise injection keep the per-layer path so that
gradient checkpointing replays the same noise.
"""

from __future__ import annotations

import torch
from torch import nn

from collections import defaultdict

from ..kernels.fastfood import StackedFastfood
from ..replicas import fsdp_kind
from .layer import RLoraLayer

_HANDLE_ATTR = "_rlr_batched_projection_handle"
_STACKS_ATTR = "_rlr_stacked_projections"


def _active_jobs(layers: list[RLoraLayer]):
    for module in layers:
        if module.disable_adapters or module.merged:
            continue
        for adapter in module.active_adapters:
            if adapter in module.rlr_z and module.rlr_config[adapter].batch_projection and not module.uses_noise(adapter):
                if fsdp_kind(module.rlr_z[adapter]) is not None:  # FSDP: z is gathered only in its block's forward
                    continue
                yield module, adapter


def _precompute_factors(model: nn.Module, args, kwargs) -> None:
    layers = [m for m in model.modules() if isinstance(m, RLoraLayer)]
    for module in layers:
        module._rlr_pending.clear()
    jobs = list(_active_jobs(layers)) if torch.is_grad_enabled() else []
    if not jobs:
        return
    groups: dict[tuple, list[tuple[RLoraLayer, str]]] = defaultdict(list)
    for module, adapter in jobs:
        proj = module.rlr_projection[adapter]
        groups[(proj.signs.numel(), module.rlr_z[adapter].device)].append((module, adapter))
    stacks = model.__dict__.setdefault(_STACKS_ATTR, {})
    for key, members in groups.items():
        projections = tuple(module.rlr_projection[adapter] for module, adapter in members)
        cached = stacks.get(key)
        if cached is None or len(cached[0]) != len(projections) or any(
            a is not b for a, b in zip(cached[0], projections)
        ):
            tensors = [proj.tensors(key[1]) for proj in projections]
            cached = (projections, StackedFastfood([t[0] for t in tensors], [t[1] for t in tensors],
                                                   [t[2] for t in tensors], [p.total_dim for p in projections]))
            stacks[key] = cached
        deltas = cached[1].project([module.rlr_z[adapter].float() for module, adapter in members])
        for (module, adapter), delta in zip(members, deltas):
            scale = module.rlr_scale[adapter] if adapter in module.rlr_scale else None
            factors = module.rlr_projection[adapter].factors_from_projection(delta, scale)
            module._rlr_pending[adapter] = (module.pending_key(adapter), factors)


def install_batched_projection(model: nn.Module) -> None:
    """Register the pre-hook once per model (idempotent across add_adapter / load_adapter)."""
    if getattr(model, _HANDLE_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_precompute_factors, with_kwargs=True)
        object.__setattr__(model, _HANDLE_ATTR, handle)
