"""Export any adapter of this package as an exact, standard PEFT LoRA adapter.

The exported folder loads with plain PEFT (no import of this package needed) and gives the same
outputs: every method materialises its (A, B) per module — no SVD, no approximation. Two layouts:

* ``layout="uniform"`` (default): one global ``r`` (the largest kept rank) for every module, smaller
  modules zero-padded (extra rows of A and columns of B are zeros), ``lora_alpha = r`` so the global
  scale ``lora_alpha / r`` is 1, and each module's own scale folded into its B. No ``rank_pattern`` /
  ``alpha_pattern``: LoRA servers that read only ``r`` and ``lora_alpha`` (vLLM's ``PEFTHelper``, and
  others) serve it exactly. Costs the padding in file size.
* ``layout="compact"``: each module keeps its own rank and scale, written as ``rank_pattern`` /
  ``alpha_pattern`` keyed by the escaped full module name. Smallest file and exact in PEFT /
  transformers, but a server that ignores the patterns applies the wrong scale (up to r_max/r_min×).

``head="separate"`` moves the ``modules_to_save`` weights (a classifier head) out of the adapter into
``head.safetensors`` beside it (keys relative to the transformers model) and drops ``modules_to_save``
from the config, since vLLM refuses adapters with ``modules_to_save``. Load the head into the base
model *before* wrapping it (:func:`load_head`), then load the adapter.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import CONFIG_NAME, ModulesToSaveWrapper, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

SAFETENSORS_NAME = "adapter_model.safetensors"
HEAD_NAME = "head.safetensors"
LAYOUTS = ("uniform", "compact")
HEADS = ("keep", "separate")
PEFT_PREFIX = "base_model.model."


def _exportable_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, BaseTunerLayer]:
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "export_factors"):
            if adapter_name in module._all_available_adapter_names():
                layers[name] = module
    return layers


def _module_key(peft_model: PeftModel, name: str) -> str:
    """Name of a module relative to the wrapped transformers model (what LoraConfig targets)."""
    return name.removeprefix("base_model.model.")


def export_lora(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str | None = None, *,
                layout: str = "uniform", head: str = "keep") -> LoraConfig:
    """Write ``adapter_name`` of ``peft_model`` to ``path`` as a plain PEFT LoRA adapter; return its config.

    ``layout``: ``"uniform"`` (default; one global ``r``, scales folded into B, no patterns: loads exactly
    in any LoRA server) or ``"compact"`` (per-module ranks and scales in ``rank_pattern``/``alpha_pattern``:
    smaller, exact in PEFT, but mis-scaled by servers that ignore the patterns, e.g. vLLM).
    ``head``: ``"keep"`` (``modules_to_save`` stay in the adapter, as PEFT saves them) or ``"separate"``
    (written to ``head.safetensors`` beside the adapter and dropped from the config; see :func:`load_head`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not allowed; choose one of {list(LAYOUTS)}")
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not allowed; choose one of {list(HEADS)}")
    if not isinstance(peft_model, PeftModel):
        raise ValueError(
            f"peft_model of type {type(peft_model).__name__} is not allowed; pass the PeftModel returned by "
            "get_peft_model or PeftModel.from_pretrained"
        )
    adapter_name = adapter_name or peft_model.active_adapter
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not allowed; choose one of {sorted(peft_model.peft_config)}"
        )
    config = peft_model.peft_config[adapter_name]
    layers = _exportable_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no layers of this package to export")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("export_lora needs an unmerged model; call unmerge_adapter() first")

    tensors: dict[str, torch.Tensor] = {}
    factors_of: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, layer in layers.items():
        factors = layer.export_factors(adapter_name)
        if factors is None:  # every rank of this module is switched off: it contributes nothing
            continue
        lora_a, lora_b, scaling = factors
        factors_of[_module_key(peft_model, name)] = (lora_a.detach().float().cpu(), lora_b.detach().float().cpu(),
                                                     float(scaling))
    ranks = {key: a.shape[0] for key, (a, _, _) in factors_of.items()}
    alphas = {key: scaling * a.shape[0] for key, (a, _, scaling) in factors_of.items()}
    r_max = max(ranks.values(), default=0)
    for key, (lora_a, lora_b, scaling) in factors_of.items():
        if layout == "uniform":  # zero-pad to r_max and fold the module's scale into B (global scale r/r = 1)
            pad = r_max - lora_a.shape[0]
            lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])], dim=0)
            lora_b = torch.cat([lora_b * scaling, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1)
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = lora_b.contiguous()

    # Auxiliary trained modules (modules_to_save, trainable tokens) and trained biases (bias="all"/"lora_only")
    # are stored exactly as for LoRA. A bias of a module the LoRA export does not adapt (every rank switched
    # off) lives at <module>.bias in the plain LoRA model, not at <module>.base_layer.bias.
    own_prefix = peft_model.base_model.prefix
    exported = {f"{PEFT_PREFIX}{key}" for key in ranks}
    heads = _head_modules(peft_model, adapter_name) if head == "separate" else []
    head_tensors: dict[str, torch.Tensor] = {}
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if own_prefix not in key:
            if any(key.startswith(f"{module}.") for module in heads):
                head_tensors[key.removeprefix(PEFT_PREFIX)] = value.detach().cpu().contiguous()
                continue
            module, _, leaf = key.rpartition(".base_layer.")
            if leaf == "bias" and module not in exported:
                key = f"{module}.bias"
            tensors[key] = value.detach().cpu().contiguous()

    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} has every module switched off; there is nothing to export")
    if layout == "uniform":
        lora_config = _lora_config(config, dict.fromkeys(ranks, r_max), dict.fromkeys(ranks, r_max))
    else:
        lora_config = _lora_config(config, ranks, alphas)
    if head == "separate" and head_tensors:
        # PEFT's SEQ_CLS wrapper would add the classifier to modules_to_save again and expect it in the adapter
        # file: the exported adapter is task-agnostic (PeftModel), the head lives in the base model.
        lora_config.modules_to_save = None
        lora_config.task_type = None
    os.makedirs(path, exist_ok=True)
    lora_config.save_pretrained(path)
    if layout == "uniform":  # one rank and one scale: leave the (empty) pattern fields out of the file altogether
        config_file = os.path.join(path, CONFIG_NAME)
        with open(config_file, encoding="utf-8") as f:
            saved = json.load(f)
        for field in ("rank_pattern", "alpha_pattern"):
            if not saved.get(field):
                saved.pop(field, None)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    head_file = os.path.join(path, HEAD_NAME)
    if head_tensors:
        save_file(head_tensors, head_file, metadata={"format": "pt"})
    elif os.path.exists(head_file):  # a stale head of an earlier export must not be loaded with this adapter
        os.remove(head_file)
    return lora_config


def _head_modules(peft_model: PeftModel, adapter_name: str) -> list[str]:
    """Full names (``base_model.model.classifier``) of the ``modules_to_save`` copies of ``adapter_name``."""
    return [name for name, module in peft_model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save]


def load_head(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ``head.safetensors`` of an export with ``head="separate"`` into the *base* model (before wrapping it
    with ``PeftModel.from_pretrained``); return the names loaded. Plain equivalent, without this package:
    ``model.load_state_dict(safetensors.torch.load_file(path + "/head.safetensors"), strict=False)``."""
    file = os.path.join(path, HEAD_NAME) if os.path.isdir(path) else str(path)
    if not os.path.isfile(file):
        raise ValueError(f"path={str(path)!r} is not allowed; pass the export folder holding {HEAD_NAME} "
                         '(written by export_lora(..., head="separate") for an adapter with modules_to_save)')
    state = load_file(file)
    missing = [key for key in state if key not in dict(model.state_dict())]
    if missing:
        raise ValueError(f"{file}: the model has no parameter {missing[0]!r}; load the head into the base model "
                         "before wrapping it with PeftModel.from_pretrained")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def _lora_config(config, ranks: dict[str, int], alphas: dict[str, float]) -> LoraConfig:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r},
        alpha_pattern={re.escape(k): v for k, v in alphas.items() if v != alpha},
        lora_dropout=getattr(config, "lora_dropout", 0.0),
        fan_in_fan_out=getattr(config, "fan_in_fan_out", False),
        bias=getattr(config, "bias", "none"),
        modules_to_save=config.modules_to_save,
        trainable_token_indices=getattr(config, "trainable_token_indices", None),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
