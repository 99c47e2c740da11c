"""bitsandbytes base layers: read a quantized weight as floats and store a merged weight back.

Merging ΔW into an 8-bit or 4-bit base cannot be done on the stored data: int8 rounds a small ΔW
to zero and packed 4-bit storage does not even have the weight's shape. As PEFT's LoRA does
(``peft/tuners/lora/bnb.py``), the weight is dequantized, ΔW is added in float, and the sum is
quantized again with the layer's own settings (4-bit: quant type, block size, double quantization,
storage type, the float dtype of the quant state; 8-bit: ``has_fp16_weights``). The layer's
``compute_dtype`` is untouched, since only its weight is replaced.

Two cases PEFT 0.21.2 gets wrong are handled here: an 8-bit layer with ``has_fp16_weights=True``
keeps a float weight (it is quantized on the fly), so it is merged as floats; and a 4-bit weight
that bitsandbytes repacked for its CPU inference kernel (``quant_state.packing_format_for_cpu``,
done at the first inference forward on CPUs with AVX512-BF16) is first put back into the standard
layout (see :func:`restore_standard_layout`).

bitsandbytes is imported only when a layer actually holds one of its weights.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

BnbKind = Literal["4bit", "8bit"]


def bnb_kind(layer: nn.Module) -> Optional[BnbKind]:
    """"4bit" / "8bit" when ``layer.weight`` is a bitsandbytes quantized parameter, else None.

    Judged by the parameter's class name (as PEFT's ``get_bnb_param_type``) so that plain layers
    never import bitsandbytes.
    """
    name = type(getattr(layer, "weight", None)).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params":
        return "8bit"
    return None


def restore_standard_layout(layer: nn.Module) -> None:
    """Put a 4-bit weight that bitsandbytes repacked for its CPU kernel back into the standard layout.

    The repacked data has a different byte order and a transposed bf16 absmax, which
    ``dequantize_4bit`` would misread. bitsandbytes' own inverse (also run by ``state_dict()``)
    restores the bytes, but in 0.50.2 leaves the absmax of a weight without double quantization
    transposed; that is repaired here too, also when ``state_dict()`` already ran the inverse.
    No-op for a weight in the standard layout.
    """
    weight = layer.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:  # pragma: no cover - every bitsandbytes that repacks has the inverse
            raise RuntimeError(
                f"{type(layer).__name__}: the 4-bit weight is in bitsandbytes' CPU inference layout and this "
                "bitsandbytes has no way to restore the standard layout, so it cannot be dequantized exactly"
            )
        weight.data, state = inverse(weight.data, state)
        weight.quant_state = state
    if not state.nested and state.absmax.dim() == 2:  # (blocks per row, rows) -> one scale per block, row-major
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = state


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float tensor of shape (out_features, in_features)."""
    from peft.utils.integrations import dequantize_bnb_weight

    kind = bnb_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        restore_standard_layout(layer)
        weight = layer.weight
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    if kind == "8bit":
        if _has_fp16_weights(layer):  # a float weight that the layer quantizes at every forward
            return weight.data.clone()
        return dequantize_bnb_weight(weight, state=layer.state)
    raise TypeError(f"{type(layer).__name__} holds no bitsandbytes quantized weight")


def requantize(layer: nn.Module, merged: torch.Tensor) -> None:
    """Store ``merged`` (float, (out, in)) as the layer's weight, quantized with the layer's own settings."""
    import bitsandbytes as bnb

    kind = bnb_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        state = weight.quant_state  # standard layout: dequantize() came first
        new = bnb.nn.Params4bit(
            merged.to(dtype=state.dtype, device="cpu"),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=weight.quant_storage,
            module=layer,
        )
        layer.weight = new.to(weight.device)  # the move quantizes (and sets layer.quant_state)
        return
    if kind == "8bit":
        fp16_weights = _has_fp16_weights(layer)
        data = (merged.to(weight.dtype) if fp16_weights else merged).to("cpu")
        new = bnb.nn.Int8Params(data, requires_grad=fp16_weights and weight.requires_grad,
                                has_fp16_weights=fp16_weights)
        layer.weight = new.to(weight.device)  # int8 storage: the move from CPU quantizes
        layer.state.reset_grads()  # drop the cached int8 copy of the old weight
        return
    raise TypeError(f"{type(layer).__name__} holds no bitsandbytes quantized weight")


def _has_fp16_weights(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight, "has_fp16_weights", False)) and layer.weight.dtype != torch.int8


def keep_standard_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking the model's 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight at the first inference forward
    (evaluation, generation, a scoring pass); in bitsandbytes 0.50.2 no gradient flows back through
    a repacked weight afterwards, so training after an evaluation would silently lose the gradient
    of every adapter below it. Called at wrap time; weights already repacked are restored. Costs
    some CPU inference speed; no effect on GPUs.
    """
    for module in model.modules():
        if bnb_kind(module) == "4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                restore_standard_layout(module)
