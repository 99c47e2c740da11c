"""Behaviour every tuner of this package shares on top of PEFT's ``BaseTuner``."""

from __future__ import annotations

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner


class LowRankTuner(BaseTuner):
    """``BaseTuner`` with a module swap that works for any wrapped module.

    PEFT's generic ``_replace_module`` copies ``child.weight`` onto a replacement without a
    ``base_layer``; that breaks ``merge_and_unload`` when ``modules_to_save`` holds a head with no
    ``weight`` (e.g. RoBERTa's classification head). LoRA overrides it the same way.
    """

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        child = getattr(child, "base_layer", child)
        weight = getattr(child, "weight", None)
        if weight is None:
            weight = next(child.parameters(), None)
        if weight is None or weight.device == torch.device("meta"):
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    def _check_new_adapter_config(self, config) -> None:
        """PEFT's checks, then refuse DeepSpeed ZeRO, under which this package's per-step work never runs.

        ZeRO steps its own flattened parameter copies, so the optimizer-step hooks that carry the
        PAC-Bayes gradient, AutoLoRA's β step, PRILoRA's pruning and HeteroLoRA's allocation would be
        skipped without any error. Refusing at wrap time is the honest alternative.
        """
        super()._check_new_adapter_config(config)
        if deepspeed_active():
            raise NotImplementedError(
                f"{type(config).__name__}: DeepSpeed ZeRO is active (a DeepSpeed config was given to "
                "TrainingArguments/accelerate), which this package does not support; use DDP or, where "
                "the README's support table says so, FSDP2."
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's remapping, then refuse a weights file that lacks any of this method's tensors (``integrity``)."""
        from .integrity import check_loaded_adapter_keys

        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_adapter_keys(model, cls, config, adapter_name, remapped)
        return remapped


def deepspeed_active() -> bool:
    """Whether transformers holds a live DeepSpeed config (set by ``TrainingArguments(deepspeed=...)``)."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return deepspeed_config() is not None


def adapted_root(model: nn.Module) -> nn.Module:
    """The transformers model that carries the adapter layers (inside a PeftModel or a tuner)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def adapter_layers(model: nn.Module, layer_cls: type, adapter_name: str | None, method: str):
    """(name, layer, adapter) of every ``layer_cls`` holding ``adapter_name`` (default: its active one)."""
    found = []
    for name, module in adapted_root(model).named_modules():
        if isinstance(module, layer_cls):
            adapter = adapter_name or module.active_adapters[0]
            if module.has_adapter(adapter):
                found.append((name, module, adapter))
    if not found:
        raise ValueError(f"the model has no {method} layers for adapter {adapter_name!r}")
    return found
