"""RLoRA tuner layer: a LoRA whose factors are regenerated from ``z`` at every forward pass."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._base.layer import AdditiveAdapterLayer
from .._base.targets import base_layer_features
from ...kernels.masked_lowrank import masked_lowrank
from .config import RLoraConfig
from .projection import FastfoodProjection


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
        self._rlr_in_forward = False  # set between the model's forward pre- and post-hook (batched.py)
        self._rlr_checked: set[str] = set()  # adapters whose cache the pre-hook verified for this pass
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
        if not config.init_weights:  # PEFT's convention: init_weights=False gives a non-trivial adapter
            std = config.z_init_std(dim, total)
            if std > 0:
                z.normal_(0.0, std)
        self.rlr_z[adapter_name] = nn.Parameter(z)
        # One-element vectors, not 0-d scalars: FSDP2 (fully_shard) and DeepSpeed ZeRO refuse 0-d parameters.
        if config.learnable_scale:
            self.rlr_scale[adapter_name] = nn.Parameter(torch.ones(1))
        if config.learn_posterior_sigma:
            self.rlr_log_sigma[adapter_name] = nn.Parameter(torch.full((1,), math.log(config.posterior_sigma)))

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
            return self.rlr_log_sigma[adapter_name].exp().sum()  # the one element as a scalar (also of a DTensor shard)
        return self.rlr_config[adapter_name].posterior_sigma

    def effective_z(self, adapter_name: str) -> torch.Tensor:
        """z, plus posterior noise σ_q·ε in training mode when noise injection is on."""
        z = self.rlr_z[adapter_name]
        if self.training and self.rlr_config[adapter_name].noise_injection:
            z = z + self.posterior_sigma(adapter_name) * torch.randn_like(z)
        return z

    def uses_noise(self, adapter_name: str) -> bool:
        return self.training and self.rlr_config[adapter_name].noise_injection

    def _pending_usable(self) -> bool:
        """Whether factors grouped by the model's forward pre-hook belong to the pass now running.

        They do inside the model's own forward (between its pre- and post-hook), and in a
        non-reentrant gradient-checkpointing recompute during backward (it must see the very same
        tensors). Anywhere else -- an inner module called on its own after the model's forward, a
        reentrant recompute -- this layer generates its own factors: reusing a finished pass's
        factors would backpropagate through a freed graph, or serve values from before an
        optimizer step.
        """
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return not _in_reentrant_recompute()
        return self._rlr_in_forward

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (A, B) of shapes (r, in) and (out, r), differentiable in z.

        With autograd on, factors grouped for the whole model at the start of its forward pass
        (``batched.py``) are used where they belong to the pass now running (``_pending_usable``).
        Without autograd (evaluation, generation, merge, export) they come from a cache that is
        checked against an exact copy of z and the scale, so no update is ever missed, whether it
        came from an optimizer (fused ones included), ``load_state_dict`` or a ``.data`` write.
        """
        scale = self.rlr_scale[adapter_name] if adapter_name in self.rlr_scale else None
        if torch.is_grad_enabled() or self.uses_noise(adapter_name):
            pending = self._rlr_pending.get(adapter_name)
            if pending is not None and pending[0] is self.rlr_z[adapter_name] and self._pending_usable():
                return pending[1]
            if not self._rlr_in_forward and torch._C._current_graph_task_id() == -1:
                # Called outside the model's forward: a later checkpoint recompute must not pick up
                # factors grouped for an earlier pass.
                self._rlr_pending.pop(adapter_name, None)
            return self.rlr_projection[adapter_name].factors(self.effective_z(adapter_name), scale)
        cached = self._rlr_factor_cache.get(adapter_name)
        if cached is not None and (adapter_name in self._rlr_checked or self.cache_matches(adapter_name, cached[0])):
            return cached[1]
        factors = self.rlr_projection[adapter_name].factors(self.rlr_z[adapter_name], scale)
        self.store_cached_factors(adapter_name, factors)
        return factors

    # ----- the inference cache: exact copies of what the factors were generated from -----------------
    def _cache_sources(self, adapter_name: str) -> list[torch.Tensor]:
        z = self.rlr_z[adapter_name]
        return [z] if adapter_name not in self.rlr_scale else [z, self.rlr_scale[adapter_name]]

    def store_cached_factors(self, adapter_name: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        sources = self._cache_sources(adapter_name)
        snapshot = (self.rlr_projection[adapter_name], sources, [t.detach().clone() for t in sources])
        self._rlr_factor_cache[adapter_name] = (snapshot, factors)

    def cache_comparable(self, adapter_name: str, snapshot: tuple) -> bool:
        """Same projection and the same tensors (object, dtype, device, shape) as when cached."""
        projection, sources, copies = snapshot
        now = self._cache_sources(adapter_name)
        return projection is self.rlr_projection[adapter_name] and len(now) == len(sources) and all(
            a is b and a.dtype == c.dtype and a.device == c.device and a.shape == c.shape
            for a, b, c in zip(now, sources, copies)
        )

    def cache_differs(self, snapshot: tuple) -> torch.Tensor:
        """A 0-dim bool tensor, True where any cached source changed value (no device sync)."""
        _, sources, copies = snapshot
        return torch.stack([(a.detach() != c).any() for a, c in zip(sources, copies)]).any()

    def cache_matches(self, adapter_name: str, snapshot: tuple) -> bool:
        return self.cache_comparable(adapter_name, snapshot) and not bool(self.cache_differs(snapshot))

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

    def effective_rank(self, adapter_name: str) -> int:
        """``r``, the rank of the generated factors (the trainable size is the intrinsic dimension)."""
        return int(self.rlr_config[adapter_name].r)

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

    def adapter_product(self, x: torch.Tensor, adapter_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        lora_a, lora_b = self.lora_factors(adapter_name)
        h = self.rlr_dropout[adapter_name](self._cast_input_dtype(x, lora_a.dtype))
        return masked_lowrank(h, lora_a, lora_b, None, self.rlr_scaling[adapter_name], base=base, kernel="aten")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.additive_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "rlora." + super().__repr__()
