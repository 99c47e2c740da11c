"""Export any adapter of this package as an exact, standard PEFT LoRA adapter.

The exported folder loads with plain PEFT (no import of this package needed) and gives the same
outputs: every method materialises its (A, B) per module — no SVD, no approximation. Per-module
ranks and scalings go into ``rank_pattern``/``alpha_pattern`` keyed by the escaped full module name.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

SAFETENSORS_NAME = "adapter_model.safetensors"


def _exportable_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, BaseTunerLayer]:
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "export_factors"):
            if adapter_name in module._all_available_adapter_names():
                layers[name] = module
    return layers


def _module_key(peft_model: PeftModel, name: str) -> str:
    """Name of a module relative to the wrapped transformers model (what LoraConfig targets)."""
    return name.removeprefix("base_model.model.")


def export_lora(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str | None = None) -> LoraConfig:
    """Write ``adapter_name`` of ``peft_model`` to ``path`` as a plain PEFT LoRA adapter; return its config."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(
            f"peft_model of type {type(peft_model).__name__} is not allowed; pass the PeftModel returned by "
            "get_peft_model or PeftModel.from_pretrained"
        )
    adapter_name = adapter_name or peft_model.active_adapter
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not allowed; choose one of {sorted(peft_model.peft_config)}"
        )
    config = peft_model.peft_config[adapter_name]
    layers = _exportable_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no layers of this package to export")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("export_lora needs an unmerged model; call unmerge_adapter() first")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in layers.items():
        factors = layer.export_factors(adapter_name)
        if factors is None:  # every rank of this module is switched off: it contributes nothing
            continue
        lora_a, lora_b, scaling = factors
        key = _module_key(peft_model, name)
        tensors[f"base_model.model.{key}.lora_A.weight"] = lora_a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{key}.lora_B.weight"] = lora_b.detach().float().cpu().contiguous()
        ranks[key] = lora_a.shape[0]
        alphas[key] = float(scaling * lora_a.shape[0])

    # Auxiliary trained modules (modules_to_save, trainable tokens) and trained biases (bias="all"/"lora_only")
    # are stored exactly as for LoRA. A bias of a module the LoRA export does not adapt (every rank switched
    # off) lives at <module>.bias in the plain LoRA model, not at <module>.base_layer.bias.
    own_prefix = peft_model.base_model.prefix
    exported = {f"base_model.model.{key}" for key in ranks}
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if own_prefix not in key:
            module, _, leaf = key.rpartition(".base_layer.")
            if leaf == "bias" and module not in exported:
                key = f"{module}.bias"
            tensors[key] = value.detach().cpu().contiguous()

    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} has every module switched off; there is nothing to export")
    lora_config = _lora_config(config, ranks, alphas)
    os.makedirs(path, exist_ok=True)
    lora_config.save_pretrained(path)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    return lora_config


def _lora_config(config, ranks: dict[str, int], alphas: dict[str, float]) -> LoraConfig:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r},
        alpha_pattern={re.escape(k): v for k, v in alphas.items() if v != alpha},
        lora_dropout=getattr(config, "lora_dropout", 0.0),
        fan_in_fan_out=getattr(config, "fan_in_fan_out", False),
        bias=getattr(config, "bias", "none"),
        modules_to_save=config.modules_to_save,
        trainable_token_indices=getattr(config, "trainable_token_indices", None),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
