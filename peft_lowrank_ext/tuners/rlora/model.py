"""RLoRA tuner: swaps target ``nn.Linear``/``Conv1D`` modules for :class:`RLoraLinear`."""

from __future__ import annotations

from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .._base.targets import align_fan_in_fan_out, base_layer_features
from .._base.tuner import LowRankTuner
from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear
from .batched import install_batched_projection
from .pac_bayes import pac_bayes_stats, register_model
from .projection import stamp_projection_fingerprint, stamp_sizes_fingerprint


class RLoraModel(LowRankTuner):
    """Creates an RLoRA model from a pretrained transformers model (use via ``get_peft_model``).

    Lei, Qian, Cheung. Fast Randomized Low-Rank Adaptation of Pre-trained Language Models with PAC
    Regularization. Findings of ACL 2024. doi:10.18653/v1/2024.findings-acl.310
    """

    prefix: str = "rlr_"
    method_name = "RLoRA"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config: RLoraConfig) -> None:
        """The shared checks, then the projection's identity: fill in the fingerprint of a new adapter, refuse a
        loaded one whose projection this install regenerates differently."""
        super()._check_new_adapter_config(config)
        stamp_projection_fingerprint(config, type(config).__name__)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, then the projections' identity at the sizes this adapter uses (every module)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        projections = {name: module.rlr_projection[adapter_name] for name, module in model.named_modules()
                       if isinstance(module, RLoraLayer) and adapter_name in module.rlr_projection}
        config = self.peft_config[adapter_name]
        stamp_sizes_fingerprint(config, projections, type(config).__name__)

    def _create_and_replace(self, config: RLoraConfig, adapter_name, target, target_name, parent, current_key, **kw):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, RLoraLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        base_layer_features(base)  # raises a clear error for unsupported layer types
        align_fan_in_fan_out(config, base)
        new_module = RLoraLinear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="cat", **kwargs) -> None:
        """Not supported: an RLoRA adapter is only its vector z, and a weighted sum of ΔW = B(z) A(z) is not
        B(z') A(z') for any z' of the fixed random projection. Export to plain LoRA and combine there."""
        raise NotImplementedError(
            "RLoRA does not support add_weighted_adapter: an RLoRA adapter stores only z, whose fixed random "
            "projection cannot express a weighted sum of adapters; export each with "
            "peft_lowrank_ext.export_lora(model, path, adapter_name) and combine them with PEFT LoRA's "
            "add_weighted_adapter (combination_type='cat' is exact).")

    def training_summary(self, adapter_name: str) -> dict:
        """The PAC-Bayes KL / bound / regularizer when the regularizer is on."""
        if not self.peft_config[adapter_name].pac_bayes_enabled:
            return {}
        try:
            return {"pac_bayes": pac_bayes_stats(self.model, adapter_name)}
        except ValueError as e:  # logging only: never fail a finished run for it
            return {"pac_bayes_error": str(e)}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Adapters saved by earlier versions stored the learned scale and log σ_q as 0-d tensors; they are 1-element
        vectors now (FSDP2 and DeepSpeed ZeRO refuse 0-d parameters): read the old ones as such."""
        state_dict = {k: (v.reshape(1) if v.dim() == 0 and ("rlr_scale" in k or "rlr_log_sigma" in k) else v)
                      for k, v in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _post_injection_hook(self, model: nn.Module, config: RLoraConfig, adapter_name: str) -> None:
        register_model(model)
        install_batched_projection(model)
