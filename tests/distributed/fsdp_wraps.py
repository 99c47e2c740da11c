"""FSDP wrapping of the tiny Llama on CPU/gloo: one unit per decoder block plus the root."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def fsdp2_wrap(model):
    """FSDP2: ``fully_shard`` each block, then the PEFT model (parameters become DTensor shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for block in model.base_model.model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp1_wrap(model):
    """FSDP1: ``FullyShardedDataParallel`` with ``use_orig_params=True`` (needed for frozen base weights
    next to trainable adapters in one unit), one unit per block."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                    auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
