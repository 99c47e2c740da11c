"""Tuner base for the allocation methods: swaps target layers for a method's gated layer."""

from __future__ import annotations


from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..base_tuner import LowRankTuner
from ..rlora.layer import base_layer_features
from ..rlora.model import align_fan_in_fan_out
from .layer import GatedLinear, GatedLoraLayer


class GatedTuner(LowRankTuner):
    """A method sets ``prefix``, ``tuner_layer_cls`` and ``linear_cls`` and may override :meth:`layer_options`."""

    tuner_layer_cls = GatedLoraLayer
    linear_cls: type[GatedLinear] = GatedLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def layer_options(self, config, module_name: str) -> dict:
        """Per-module ``r``, ``lora_alpha`` and layer flags (PRILoRA overrides the rank by depth)."""
        return {"r": config.r, "lora_alpha": config.lora_alpha}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        options = self.layer_options(config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **options)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        base_layer_features(base)  # clear error for unsupported layer types
        align_fan_in_fan_out(config, base)
        new_module = self.linear_cls(target, adapter_name, config, **options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def gated_layers(self, adapter_name: str | None = None):
        """(name, layer) of every gated layer holding ``adapter_name`` (default: the active adapter)."""
        adapter_name = adapter_name or self.active_adapters[0]
        for name, module in self.model.named_modules():
            if isinstance(module, self.tuner_layer_cls) and adapter_name in module._store("A"):
                yield name, module
