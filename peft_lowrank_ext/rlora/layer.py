"""RLoRA tuner layer: a LoRA whose factors are regenerated from ``z`` at every forward pass."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


from ..base_layer import AdditiveAdapterLayer

from .config import RLoraConfig
from .projection import FastfoodProjection

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


def base_layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        weight = base_layer.weight
        d_in, d_out = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return d_in, d_out
    raise ValueError(
        f"target module of type {type(base_layer).__name__} is not allowed; RLoRA adapts only "
        "torch.nn.Linear and transformers' Conv1D. Narrow target_modules to such layers."
    )


def _in_reentrant_recompute() -> bool:
    """True in a reentrant gradient-checkpointing recompute: inside a backward pass, with no saved-tensor hooks.

    A non-reentrant recompute also runs inside the backward pass, but under checkpoint's saved-tensor
    hooks; it must reuse the grouped factors so that its saved tensors match the forward pass.
    """
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class RLoraLayer(AdditiveAdapterLayer):
    """Holds, per adapter, the trainable ``z`` and the regenerated projection that maps it to (A, B)."""

    adapter_layer_names = ("rlr_z", "rlr_scale", "rlr_log_sigma")
    other_param_names = ("rlr_projection", "rlr_scaling", "rlr_dropout", "rlr_config", "_rlr_factor_cache", "_rlr_pending")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.rlr_z = nn.ParameterDict({})
        self.rlr_scale = nn.ParameterDict({})
        self.rlr_log_sigma = nn.ParameterDict({})
        self.rlr_projection: dict[str, FastfoodProjection] = {}
        self.rlr_scaling: dict[str, float] = {}
        self.rlr_dropout = nn.ModuleDict({})
        self.rlr_config: dict[str, RLoraConfig] = {}
        self._rlr_factor_cache: dict[str, tuple] = {}
        self._rlr_pending: dict[str, tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: RLoraConfig, module_name: str, **kwargs) -> None:
        total = config.r * (self.in_features + self.out_features)
        if config.intrinsic_dim is not None:
            dim = config.intrinsic_dim
            if dim > total:
                raise ValueError(
                    f"RLoraConfig.intrinsic_dim={dim} is not allowed for module {module_name!r}: it must be in "
                    f"[1, D] with D = r·(in+out) = {config.r}·({self.in_features}+{self.out_features}) = {total}."
                )
        else:
            dim = math.ceil(config.projection_ratio * total)
        self.rlr_projection[adapter_name] = FastfoodProjection.generate(
            r=config.r,
            in_features=self.in_features,
            out_features=self.out_features,
            intrinsic_dim=dim,
            seed=config.seed,
            module_name=module_name,
        )
        self.rlr_config[adapter_name] = config
        self.rlr_scaling[adapter_name] = config.lora_alpha / config.r
        self.rlr_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

        z = torch.zeros(dim)
        if not config.init_weights and config.init_std > 0:
            z.normal_(0.0, config.init_std)
        self.rlr_z[adapter_name] = nn.Parameter(z)
        if config.learnable_scale:
            self.rlr_scale[adapter_name] = nn.Parameter(torch.ones(()))
        if config.learn_posterior_sigma:
            self.rlr_log_sigma[adapter_name] = nn.Parameter(torch.tensor(math.log(config.posterior_sigma)))

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._upcast_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _upcast_adapter(self, adapter_name: str) -> None:
        """z is a tiny vector: keep it in fp32 even on a half-precision base model."""
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].dtype in (torch.float16, torch.bfloat16):
                params[adapter_name] = nn.Parameter(params[adapter_name].float())

    # ----- the adapter's numbers -------------------------------------------------------------
    def posterior_sigma(self, adapter_name: str) -> torch.Tensor | float:
        if adapter_name in self.rlr_log_sigma:
            return self.rlr_log_sigma[adapter_name].exp()
        return self.rlr_config[adapter_name].posterior_sigma

    def effective_z(self, adapter_name: str) -> torch.Tensor:
        """z, plus posterior noise σ_q·ε in training mode when noise injection is on."""
        z = self.rlr_z[adapter_name]
        if self.training and self.rlr_config[adapter_name].noise_injection:
            z = z + self.posterior_sigma(adapter_name) * torch.randn_like(z)
        return z

    def _state_key(self, adapter_name: str) -> tuple:
        """Identifies the current values of z (and the scale): any in-place update changes it."""
        z = self.rlr_z[adapter_name]
        scale = self.rlr_scale.get(adapter_name) if adapter_name in self.rlr_scale else None
        return (z.data_ptr(), z._version, z.device, None if scale is None else (scale.data_ptr(), scale._version))

    def pending_key(self, adapter_name: str) -> tuple:
        """Cheap validity token for grouped factors: the z object and its version (if not compiling)."""
        z = self.rlr_z[adapter_name]
        return (z, None if torch.compiler.is_compiling() else z._version)

    def _pending_is_current(self, adapter_name: str, key: tuple) -> bool:
        z = self.rlr_z[adapter_name]
        return key[0] is z and (torch.compiler.is_compiling() or key[1] == z._version)

    def uses_noise(self, adapter_name: str) -> bool:
        return self.training and self.rlr_config[adapter_name].noise_injection

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (A, B) of shapes (r, in) and (out, r), differentiable in z.

        With autograd on, factors generated for the whole model at the start of the forward pass
        (see ``batched.py``) are used if present; they stay until the next forward pass so that a
        non-reentrant gradient-checkpointing recompute sees the very same tensors. A *reentrant*
        recompute regenerates this layer's factors on its own: the grouped factors share one graph,
        which it would otherwise backpropagate once per checkpointed segment ("backward through the
        graph a second time"). Without autograd (inference, generation)
        they are cached until z or the scale changes, so decoding does not regenerate them per token.
        """
        scale = self.rlr_scale[adapter_name] if adapter_name in self.rlr_scale else None
        if torch.is_grad_enabled() or self.uses_noise(adapter_name):
            pending = self._rlr_pending.get(adapter_name)
            current = pending is not None and self._pending_is_current(adapter_name, pending[0])
            if current and not _in_reentrant_recompute():
                return pending[1]
            return self.rlr_projection[adapter_name].factors(self.effective_z(adapter_name), scale)
        key = self._state_key(adapter_name)
        cached = self._rlr_factor_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, self.rlr_projection[adapter_name].factors(self.rlr_z[adapter_name], scale))
            self._rlr_factor_cache[adapter_name] = cached
        return cached[1]

    def export_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Deterministic (A, B, scaling) such that ΔW = scaling · B A, for export to plain LoRA."""
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad():
                lora_a, lora_b = self.lora_factors(adapter_name)
        finally:
            self.train(was_training)
        return lora_a, lora_b, self.rlr_scaling[adapter_name]

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.rlr_z


class RLoraLinear(nn.Module, RLoraLayer):
    """RLoRA around ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLoraConfig, module_name: str, **kwargs):
        super().__init__()
        RLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def adapter_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_factors(adapter_name)
        h = self.rlr_dropout[adapter_name](self._cast_input_dtype(x, lora_a.dtype))
        return (h @ lora_a.t()) @ lora_b.t() * self.rlr_scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.additive_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "rlora." + super().__repr__()
