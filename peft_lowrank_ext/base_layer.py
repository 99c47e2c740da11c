"""What every adapter layer of this package shares: ΔW from exported factors, merge and unmerge.

Each method materialises its adapter as LoRA factors (``export_factors``: (A, B, scaling) with
ΔW = scaling · B A, or None when nothing is kept), so ΔW, merging and export to plain LoRA are
written once here.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose


class AdditiveAdapterLayer(BaseTunerLayer):
    """A ``BaseTunerLayer`` whose adapter adds ΔW = scaling · B A to the base weight."""

    fan_in_fan_out: bool = False

    def has_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def export_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        raise NotImplementedError

    def adapter_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's additive output for input ``x`` (before casting to the result dtype)."""
        raise NotImplementedError

    def adapter_is_on(self, adapter_name: str) -> bool:
        return True

    def before_adapter_forward(self, x: torch.Tensor) -> None:
        """Hook for policies that observe the layer input (PRILoRA's input statistics)."""

    def additive_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active adapter_update(x)``, honouring disable and merged states like LoRA."""
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        self.before_adapter_forward(x)
        for adapter in self.active_adapters:
            if self.has_adapter(adapter) and self.adapter_is_on(adapter):
                result = result + self.adapter_update(x, adapter).to(result.dtype)
        return result.to(previous_dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base weight's layout (transposed for Conv1D) and dtype."""
        weight = self.get_base_layer().weight
        factors = self.export_factors(adapter_name)
        if factors is None:
            return torch.zeros_like(weight)
        lora_a, lora_b, scaling = factors
        return (transpose(lora_b @ lora_a, self.fan_in_fan_out) * scaling).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if not self.has_adapter(adapter):
                continue
            delta = self.get_delta_weight(adapter)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self.has_adapter(adapter):
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)
