"""Generate the factors of every RLoRA layer in a few grouped launches per forward pass.

PEFT calls each tuner layer separately, which would mean one projection launch per module. A
forward pre-hook on the adapted model instead projects all active adapters at once (one launch
chain per distinct Hadamard length, with the random factors stacked once per group and reused:
``kernels.fastfood.StackedFastfood``) and hands each layer its (A, B) for this pass; the matching
post-hook closes the pass. Without autograd the pre-hook first checks every layer's inference
cache against z in one device sync and regenerates only what changed. Layers with noise injection
keep the per-layer path so that gradient checkpointing replays the same noise.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ...kernels.fastfood import StackedFastfood
from ...runtime.distributed import fsdp_kind
from .layer import RLoraLayer

_HANDLE_ATTR = "_rlr_batched_projection_handle"
_STACKS_ATTR = "_rlr_stacked_projections"
_LAYERS_ATTR = "_rlr_layers_in_forward"


def _active_jobs(layers: list[RLoraLayer]):
    for module in layers:
        if module.disable_adapters or module.merged:
            continue
        for adapter in module.active_adapters:
            if adapter in module.rlr_z and module.rlr_config[adapter].batch_projection and not module.uses_noise(adapter):
                if fsdp_kind(module.rlr_z[adapter]) is not None:  # FSDP: z is gathered only in its block's forward
                    continue
                yield module, adapter


def _grouped_factors(model: nn.Module, jobs: list[tuple[RLoraLayer, str]]):
    """(layer, adapter, (A, B)) for every job, projected in one launch chain per Hadamard length."""
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
            yield module, adapter, module.rlr_projection[adapter].factors_from_projection(delta, scale)


def _stale_inference_jobs(jobs: list[tuple[RLoraLayer, str]]) -> list[tuple[RLoraLayer, str]]:
    """Mark the jobs whose inference cache is still exact as checked; return the others."""
    comparable, stale = [], []
    for module, adapter in jobs:
        cached = module._rlr_factor_cache.get(adapter)
        if cached is not None and module.cache_comparable(adapter, cached[0]):
            comparable.append((module, adapter, cached[0]))
        else:
            stale.append((module, adapter))
    if comparable:
        changed = torch.stack([m.cache_differs(snap).to("cpu", non_blocking=True) for m, _, snap in comparable])
        for (module, adapter, _), differs in zip(comparable, changed.tolist()):  # one sync for all layers
            if differs:
                stale.append((module, adapter))
            else:
                module._rlr_checked.add(adapter)
    return stale


def _open_pass(model: nn.Module, args, kwargs) -> None:
    layers = [m for m in model.modules() if isinstance(m, RLoraLayer)]
    object.__setattr__(model, _LAYERS_ATTR, layers)
    for module in layers:
        module._rlr_pending.clear()
        module._rlr_checked.clear()
        module._rlr_in_forward = True
    jobs = list(_active_jobs(layers))
    if not jobs:
        return
    if torch.is_grad_enabled():
        for module, adapter, factors in _grouped_factors(model, jobs):
            module._rlr_pending[adapter] = (module.rlr_z[adapter], factors)
        return
    stale = _stale_inference_jobs(jobs)
    for module, adapter, factors in _grouped_factors(model, stale):
        module.store_cached_factors(adapter, factors)
        module._rlr_checked.add(adapter)


def _close_pass(model: nn.Module, *args) -> None:
    for module in model.__dict__.pop(_LAYERS_ATTR, ()):
        module._rlr_in_forward = False
        module._rlr_checked.clear()


def install_batched_projection(model: nn.Module) -> None:
    """Register the pre- and post-hook once per model (idempotent across add_adapter / load_adapter)."""
    if getattr(model, _HANDLE_ATTR, None) is None:
        handles = (
            model.register_forward_pre_hook(_open_pass, with_kwargs=True),
            model.register_forward_hook(_close_pass, always_call=True),
        )
        object.__setattr__(model, _HANDLE_ATTR, handles)
