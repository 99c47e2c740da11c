"""The one masked/gated low-rank layer that AutoLoRA, PRILoRA and HeteroLoRA share.

``ΔW = s · B · diag(g) · (A ⊙ M)`` with full-size ``A (r, in)`` and ``B (out, r)`` fixed for the
whole of training, a per-rank gate ``g = rank_mask · module_on · soft_gate`` and an optional
element mask ``M`` on ``A``. ``s = lora_alpha / r`` never depends on how many ranks are kept, so a
pruned adapter reloads with identical outputs. Masks and gates are persistent buffers saved with
the adapter; shapes never change (optimizers and ``resume_from_checkpoint`` keep working) and the
kept ranks are compacted only on export. Each method is a subclass that sets ``prefix`` (all
attribute names derive from it) and, if needed, overrides :meth:`soft_gate`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict

from .._base.layer import AdditiveAdapterLayer
from .._base.targets import base_layer_features
from ...kernels.masked_lowrank import masked_lowrank

# Per-adapter containers; each is stored as an attribute named ``prefix + kind``.
TRAINABLE_KINDS = ("A", "B")
BUFFER_KINDS = ("rank_mask", "element_mask", "module_on")
PLAIN_KINDS = ("r", "scaling", "dropout", "config", "module_on_cache")


class GatedLoraLayer(AdditiveAdapterLayer):
    """LoRA with per-rank gates, an optional element mask on A and a module switch."""

    prefix: str = "gated_"
    # Extra persistent per-adapter buffers a method needs (e.g. PRILoRA's input statistics).
    extra_buffer_kinds: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        p = cls.prefix
        cls.adapter_layer_names = tuple(p + k for k in TRAINABLE_KINDS)
        cls.other_param_names = tuple(p + k for k in BUFFER_KINDS + cls.extra_buffer_kinds + PLAIN_KINDS)

    def _store(self, kind: str):
        return getattr(self, self.prefix + kind)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self._init_adapter_containers()
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer_features(self.get_base_layer())

    def _init_adapter_containers(self) -> None:
        """The empty per-adapter containers named ``prefix + kind`` and PEFT's merge/disable state."""
        for kind in TRAINABLE_KINDS:
            setattr(self, self.prefix + kind, nn.ParameterDict({}))
        for kind in BUFFER_KINDS + self.extra_buffer_kinds:
            setattr(self, self.prefix + kind, BufferDict({}, persistent=True))
        setattr(self, self.prefix + "dropout", nn.ModuleDict({}))
        for kind in ("r", "scaling", "config", "module_on_cache"):
            setattr(self, self.prefix + kind, {})
        self._disable_adapters = False
        self.merged_adapters = []

    # ----- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, r: int, lora_alpha: float, *, element_mask: bool = False) -> None:
        """Create one adapter: A Kaiming-uniform, B zero (no-op start), all ranks and the module on."""
        self._store("r")[adapter_name] = r
        self._store("scaling")[adapter_name] = lora_alpha / r
        self._store("config")[adapter_name] = config
        dropout = getattr(config, "lora_dropout", 0.0)
        self._store("dropout")[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        lora_a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        lora_b = torch.zeros(self.out_features, r)
        if not getattr(config, "init_weights", True):  # as PEFT's LoRA with init_lora_weights=False
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
        self._store("A")[adapter_name] = nn.Parameter(lora_a)
        self._store("B")[adapter_name] = nn.Parameter(lora_b)
        self._store("rank_mask")[adapter_name] = torch.ones(r)
        self._store("module_on")[adapter_name] = torch.ones(())
        if element_mask:
            self._store("element_mask")[adapter_name] = torch.ones(r, self.in_features)
        self.init_extra_buffers(adapter_name, config)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._keep_fp32(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def init_extra_buffers(self, adapter_name: str, config) -> None:
        """Hook for methods with extra buffers (``extra_buffer_kinds``)."""

    def _keep_fp32(self, adapter_name: str) -> None:
        """Adapter weights, gates and statistics stay fp32 on a half-precision base model."""
        for kind in TRAINABLE_KINDS + BUFFER_KINDS + self.extra_buffer_kinds:
            store = self._store(kind)
            if adapter_name in store and store[adapter_name].dtype in (torch.float16, torch.bfloat16):
                value = store[adapter_name].float()
                store[adapter_name] = nn.Parameter(value) if isinstance(store, nn.ParameterDict) else value

    # ----- the gate (the policy's handle) -----------------------------------------------------
    def soft_gate(self, adapter_name: str) -> torch.Tensor | None:
        """Learned per-rank weights (AutoLoRA overrides it); None means all ones."""
        return None

    def gate(self, adapter_name: str) -> torch.Tensor:
        g = self._store("rank_mask")[adapter_name] * self._store("module_on")[adapter_name]
        soft = self.soft_gate(adapter_name)
        return g if soft is None else g * soft

    def element_mask(self, adapter_name: str) -> torch.Tensor | None:
        masks = self._store("element_mask")
        return masks[adapter_name] if adapter_name in masks else None

    def adapter_is_on(self, adapter_name: str) -> bool:
        return self.is_on(adapter_name)

    def is_on(self, adapter_name: str) -> bool:
        """Module switch as a Python bool, re-read only when the buffer changes (no GPU sync per forward)."""
        flag = self._store("module_on")[adapter_name]
        if torch.compiler.is_compiling():
            return bool(flag != 0)
        key = (flag.data_ptr(), flag._version)
        cached = self._store("module_on_cache").get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, bool(flag != 0))
            self._store("module_on_cache")[adapter_name] = cached
        return cached[1]

    # ----- weights ----------------------------------------------------------------------------
    def export_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Compact (A, B, scaling) of the kept ranks with ΔW = scaling · B A exactly; None if none kept."""
        with torch.no_grad():
            gate = self.gate(adapter_name).float()
            kept = torch.nonzero(gate, as_tuple=True)[0]
            if kept.numel() == 0:
                return None
            lora_a = self._store("A")[adapter_name].float()
            mask = self.element_mask(adapter_name)
            if mask is not None:
                lora_a = lora_a * mask
            lora_b = self._store("B")[adapter_name].float() * gate
        return lora_a[kept].clone(), lora_b[:, kept].clone(), self._store("scaling")[adapter_name]

    def effective_rank(self, adapter_name: str) -> int:
        """Ranks whose gate is on: ``rank_mask`` entries ≠ 0, and 0 when the module is switched off."""
        with torch.no_grad():
            if not bool(self._store("module_on")[adapter_name] != 0):
                return 0
            return int(torch.count_nonzero(self._store("rank_mask")[adapter_name]))

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._store("A")

    def adapter_product(self, x: torch.Tensor, adapter_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        lora_a = self._store("A")[adapter_name]
        h = self._store("dropout")[adapter_name](self._cast_input_dtype(x, lora_a.dtype))
        return masked_lowrank(
            h, lora_a, self._store("B")[adapter_name], self.gate(adapter_name), self._store("scaling")[adapter_name],
            self.element_mask(adapter_name), base=base,
        )


class GatedLinear(nn.Module, GatedLoraLayer):
    """Gated low-rank adapter around ``nn.Linear`` / ``Conv1D``; methods subclass it to set ``prefix``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float, **kwargs):
        super().__init__()
        GatedLoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.additive_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return self.prefix.rstrip("_") + "." + super().__repr__()
