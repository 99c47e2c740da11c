"""Generate the factors of every RLoRA layer in a few grouped launches per forward pass.

PEFT calls each tuner layer separately, which would mean one projection launch per module. A
forward pre-hook on the adapted model instead projects all active adapters at once (one launch
chain per distinct Hadamard length, see ``kernels.fastfood.fastfood_project_grouped``) and hands
each layer its (A, B) for this pass. Layers with noise injection keep the per-layer path so that
gradient checkpointing replays the same noise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fastfood import FastfoodInput, fastfood_project_grouped
from .layer import RLoraLayer

_HANDLE_ATTR = "_rlr_batched_projection_handle"


def _active_jobs(model: nn.Module):
    for module in model.modules():
        if not isinstance(module, RLoraLayer) or module.disable_adapters or module.merged:
            continue
        for adapter in module.active_adapters:
            if adapter in module.rlr_z and module.rlr_config[adapter].batch_projection and not module.uses_noise(adapter):
                yield module, adapter


def _precompute_factors(model: nn.Module, args, kwargs) -> None:
    jobs = list(_active_jobs(model)) if torch.is_grad_enabled() else []
    for module in model.modules():
        if isinstance(module, RLoraLayer):
            module._rlr_pending.clear()
    if not jobs:
        return
    inputs = []
    for module, adapter in jobs:
        proj = module.rlr_projection[adapter]
        z = module.rlr_z[adapter]
        signs, perm, gauss, _ = proj.tensors(z.device)
        inputs.append(FastfoodInput(z.float(), signs, perm, gauss, proj.total_dim))
    for (module, adapter), delta in zip(jobs, fastfood_project_grouped(inputs)):
        scale = module.rlr_scale[adapter] if adapter in module.rlr_scale else None
        factors = module.rlr_projection[adapter].factors_from_projection(delta, scale)
        module._rlr_pending[adapter] = (module.pending_key(adapter), factors)


def install_batched_projection(model: nn.Module) -> None:
    """Register the pre-hook once per model (idempotent across add_adapter / load_adapter)."""
    if getattr(model, _HANDLE_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_precompute_factors, with_kwargs=True)
        object.__setattr__(model, _HANDLE_ATTR, handle)
