"""What every adapter layer of this package shares: ΔW from exported factors, merge and unmerge.

Each method materialises its adapter as LoRA factors (``export_factors``: (A, B, scaling) with
ΔW = scaling · B A, or None when nothing is kept), so ΔW, merging and export to plain LoRA are
written once here. Merging into a bitsandbytes 8-bit/4-bit base goes through ``quantized.py``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose

from . import quantized


class AdditiveAdapterLayer(BaseTunerLayer):
    """A ``BaseTunerLayer`` whose adapter adds ΔW = scaling · B A to the base weight."""

    fan_in_fan_out: bool = False

    def has_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def export_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        raise NotImplementedError

    def effective_rank(self, adapter_name: str) -> int:
        """The rank this adapter has here now, as ``module_ranks`` reports it (0: nothing kept).

        By default the rank of the exported factors; methods override it with a cheaper or more
        telling answer (RLoRA's ``r``, the gated layers' kept ranks, AutoLoRA during its search).
        """
        factors = self.export_factors(adapter_name)
        return 0 if factors is None else int(factors[0].shape[0])

    def adapter_product(self, x: torch.Tensor, adapter_name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's additive output for input ``x``; with ``base`` (the base layer's output), ``base`` plus
        it in base's dtype, accumulated by the product itself (``addmm``) where that rounds the same."""
        raise NotImplementedError

    def adapter_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's additive output for input ``x`` (before casting to the result dtype)."""
        return self.adapter_product(x, adapter_name)

    def adapter_add(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` plus the adapter's output for ``x``, in result's dtype."""
        return self.adapter_product(x, adapter_name, base=result)

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
                result = self.adapter_add(result, x, adapter)
        return result.to(previous_dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base weight's layout (transposed for Conv1D) and dtype.

        On a bitsandbytes base the stored weight is int8 or packed 4-bit (its shape is not the
        layer's), so ΔW is float32 of shape (out_features, in_features) there.
        """
        delta = self._delta_weight(adapter_name)
        if delta is None:  # nothing kept: zeros of the same shape and dtype
            weight = self.get_base_layer().weight
            shape, dtype = self._delta_layout()
            return torch.zeros(shape, dtype=dtype, device=weight.device)
        return delta

    def _delta_layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        base_layer = self.get_base_layer()
        if quantized.bnb_kind(base_layer) is not None:
            return (self.out_features, self.in_features), torch.float32
        return tuple(base_layer.weight.shape), base_layer.weight.dtype

    def _delta_weight(self, adapter_name: str) -> Optional[torch.Tensor]:
        """ΔW as :meth:`get_delta_weight` gives it, or None when the adapter keeps no rank here."""
        factors = self.export_factors(adapter_name)
        if factors is None:
            return None
        lora_a, lora_b, scaling = factors
        shape, dtype = self._delta_layout()
        delta = transpose(lora_b @ lora_a, self.fan_in_fan_out) * scaling
        if tuple(delta.shape) != shape:
            raise RuntimeError(
                f"{type(self).__name__}: ΔW has shape {tuple(delta.shape)} but the base layer "
                f"{type(self.get_base_layer()).__name__} needs {shape}"
            )
        return delta.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW of ``adapter_names`` (default: the active adapters) to the base weight.

        A bitsandbytes 8-bit/4-bit base is dequantized, ΔW added in float32 and the sum quantized
        again (see ``quantized.py``); any other base whose weight is not plain floating point
        raises instead of merging inexactly. ``safe_merge`` checks the merged weight for NaN/inf
        before it replaces the base weight.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if self.has_adapter(a)]
        if not adapter_names:
            return
        kind = _merge_kind(self.get_base_layer())
        for adapter in adapter_names:
            delta = self._delta_weight(adapter)
            if delta is not None:  # an adapter with no rank kept here leaves the weight (and its quantization) alone
                self._add_to_base_weight(kind, delta, adapter, check=safe_merge, verb="Merging into")
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        kind = _merge_kind(self.get_base_layer())
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            delta = self._delta_weight(adapter) if self.has_adapter(adapter) else None
            if delta is not None:
                self._add_to_base_weight(kind, -delta, adapter, check=False, verb="Unmerging from")

    def _add_to_base_weight(self, kind: str, delta: torch.Tensor, adapter: str, *, check: bool, verb: str) -> None:
        """``W ← W + delta`` for a dense weight (``kind="dense"``) or a bitsandbytes one ("4bit"/"8bit")."""
        base_layer = self.get_base_layer()
        if kind == "dense":
            if check:
                merged = base_layer.weight.data + delta
                _require_finite(merged, adapter)
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            return
        warnings.warn(
            f"{verb} a {kind} quantized {type(base_layer).__name__}: the weight is quantized again, so outputs "
            "differ from the unmerged model by the quantization error (as for PEFT's LoRA)."
        )
        merged = quantized.dequantize(base_layer).to(delta.device, torch.float32) + delta.float()
        if check:
            _require_finite(merged, adapter)
        quantized.requantize(base_layer, merged)


def _require_finite(weight: torch.Tensor, adapter: str) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")


def _merge_kind(base_layer: torch.nn.Module) -> str:
    """"4bit"/"8bit" for a bitsandbytes base, "dense" for a plain floating-point weight; else a clear error.

    ΔW can only be added exactly to a weight stored as ordinary floats (fp16 or wider) or to one we
    know how to dequantize and quantize again. Anything else (float8, other quantization libraries'
    weight types) is refused rather than merged with ΔW rounded away.
    """
    kind = quantized.bnb_kind(base_layer)
    if kind is not None:
        return kind
    weight = getattr(base_layer, "weight", None)
    data = getattr(weight, "data", None)
    plain = type(data) is torch.Tensor or type(data).__name__ == "DTensor"
    if plain and data.dtype.is_floating_point and data.dtype.itemsize >= 2:
        return "dense"
    described = "no weight" if weight is None else (
        f"a weight of type {type(weight).__name__} (data {type(data).__name__}, dtype {getattr(data, 'dtype', None)})")
    raise TypeError(
        f"cannot merge into a base layer of type {type(base_layer).__name__} with {described}: merging is only "
        "exact for a floating-point weight of 16 bits or more (torch.nn.Linear, transformers' Conv1D) and for "
        "bitsandbytes Linear8bitLt/Linear4bit. Keep the adapter unmerged, or export it with export_lora."
    )
