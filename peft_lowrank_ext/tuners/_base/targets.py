"""Which base layers every method adapts, and how their layout is read: ``nn.Linear`` and ``Conv1D``."""

from __future__ import annotations

import warnings

from torch import nn
from transformers.pytorch_utils import Conv1D

def base_layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer; a clear error for any other type."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        weight = base_layer.weight
        d_in, d_out = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return d_in, d_out
    raise ValueError(
        f"target module of type {type(base_layer).__name__} is not allowed; this package's methods adapt only "
        "torch.nn.Linear and transformers' Conv1D. Narrow target_modules to such layers."
    )


def align_fan_in_fan_out(config, base: nn.Module) -> None:
    """Conv1D stores (in, out): set ``fan_in_fan_out`` to match the layer, as PEFT's LoRA does."""
    wants = isinstance(base, Conv1D)
    if config.fan_in_fan_out != wants:
        warnings.warn(f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target is {type(base).__name__}; "
                      f"setting fan_in_fan_out to {wants}.")
        config.fan_in_fan_out = wants
