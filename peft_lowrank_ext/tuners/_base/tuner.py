"""Behaviour every tuner of this package shares on top of PEFT's ``BaseTuner``."""

from __future__ import annotations

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner

from .checks import _is_real


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

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """PEFT's preparation, then keep bitsandbytes 4-bit bases trainable after an inference pass."""
        from .quantized import keep_standard_layout

        super()._prepare_model(peft_config, model)
        keep_standard_layout(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention: adapter weights in fp32 (``autocast_adapter_dtype=True``, the default) or, when
        that is False, in the dtype of the layer they adapt.

        The layers create their weights in fp32 on any base model; with ``autocast_adapter_dtype=False`` the
        trainable weights are cast to the base layer's floating dtype here, as LoRA's are. Masks, gates and
        statistics (buffers) stay fp32. Shortcut candidates of HeteroLoRA wrap no layer and stay fp32.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, self.tuner_layer_cls) or not hasattr(module, "base_layer"):
                continue
            weight = getattr(module.get_base_layer(), "weight", None)
            if weight is None or not weight.dtype.is_floating_point:
                continue
            for name in module.adapter_layer_names:
                params = getattr(module, name, None)
                if isinstance(params, nn.ParameterDict) and adapter_name in params:
                    param = params[adapter_name]
                    if param.dtype.is_floating_point and param.dtype != weight.dtype:
                        params[adapter_name] = nn.Parameter(param.detach().to(weight.dtype),
                                                            requires_grad=param.requires_grad)

    def _check_weighted_adapter_args(self, adapters, weights, adapter_name, combination_type, allowed, method,
                                     **lora_only_args) -> None:
        """One clear error for a bad ``add_weighted_adapter`` call (LoRA's signature; only ``allowed`` types)."""
        owner = f"{method} add_weighted_adapter"
        if combination_type not in allowed:
            raise ValueError(f"{owner}: combination_type={combination_type!r} is not allowed; it must be one of "
                             f"{', '.join(repr(a) for a in allowed)} (an exact concatenation of the adapters' "
                             "kept ranks, each scaled by its weight)")
        for name, value in lora_only_args.items():
            if value is not None:
                raise ValueError(f"{owner}: {name}={value!r} is not allowed with combination_type="
                                 f"{combination_type!r}; it must be None (it only applies to LoRA's svd/ties/dare "
                                 "combination types)")
        if (not isinstance(adapters, (list, tuple)) or not adapters
                or not all(isinstance(a, str) for a in adapters)):
            raise ValueError(f"{owner}: adapters={adapters!r} is not allowed; it must be a non-empty list of adapter "
                             f"names, some of {sorted(self.peft_config)}")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"{owner}: adapters={list(adapters)!r} is not allowed; {unknown[0]!r} is not an adapter "
                             f"of this model, which has {sorted(self.peft_config)}")
        if (not isinstance(weights, (list, tuple)) or len(weights) != len(adapters)
                or not all(_is_real(w) for w in weights)):
            raise ValueError(f"{owner}: weights={weights!r} is not allowed; it must be a list of {len(adapters)} "
                             "finite numbers, one per adapter")
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name in self.peft_config:
            raise ValueError(f"{owner}: adapter_name={adapter_name!r} is not allowed; it must be a new adapter name "
                             f"(not one of {sorted(self.peft_config)})")

    def training_summary(self, adapter_name: str) -> dict:
        """Method-specific numbers for a finished run's record (``train.loop``); none by default."""
        return {}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's remapping, then refuse a weights file that lacks any of this method's tensors (``integrity``)."""
        from ...runtime.integrity import check_loaded_adapter_keys

        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_adapter_keys(model, cls, config, adapter_name, remapped)
        return remapped


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP1 wrappers (their ``.module``); FSDP2 and plain models as they are."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


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
