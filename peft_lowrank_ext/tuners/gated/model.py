"""Tuner base for the allocation methods: swaps target layers for a method's gated layer."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper

from .._base.tuner import LowRankTuner
from .._base.targets import align_fan_in_fan_out, base_layer_features
from ...kernels.masked_lowrank import resolve_kernel
from .layer import GatedLinear, GatedLoraLayer

COMBINATION_TYPES = ("cat",)


class GatedTuner(LowRankTuner):
    """A method sets ``prefix``, ``tuner_layer_cls`` and ``linear_cls`` and may override :meth:`layer_options`."""

    method_name = "gated LoRA"
    tuner_layer_cls = GatedLoraLayer
    linear_cls: type[GatedLinear] = GatedLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def layer_options(self, config, module_name: str) -> dict:
        """Per-module ``r``, ``lora_alpha`` and layer flags (PRILoRA overrides the rank by depth)."""
        return {"r": config.r, "lora_alpha": config.lora_alpha}

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        resolve_kernel()  # a bad $PEFT_LOWRANK_EXT_MASKED_KERNEL fails when the model is wrapped, not mid-training
        super()._prepare_model(peft_config, model)

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

    # ----- weighted combination of adapters ---------------------------------------------------------
    def combined_config(self, config, rank: int, shortcut_rank: int, target_modules: list[str]):
        """The config of a combination: ``config`` (the first adapter's) with every module at ``rank`` and
        scaling 1 (the adapters' own scalings and weights are folded into the combined A), targeting exactly
        ``target_modules`` (full names), without biases (they belong to the base model, not to an adapter)."""
        return dataclasses.replace(
            config, r=rank, lora_alpha=float(rank), target_modules=target_modules, exclude_modules=None,
            layers_to_transform=None, layers_pattern=None, bias="none")

    def after_weighted_fill(self, adapter_name: str, empty_layers: list[GatedLoraLayer]) -> None:
        """Hook after the combined weights are written; ``empty_layers`` got no rank from any adapter."""

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "cat",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: Optional[bool] = None,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: Optional[str] = None,
    ) -> None:
        """Add ``adapter_name`` with ``ΔW = Σ_i weights[i] · ΔW_i`` exactly, as LoRA's ``combination_type="cat"``.

        Per module, the kept ranks of every adapter are concatenated: ``A = [w_i s_i A_i ⊙ M_i]`` and
        ``B = [B_i diag(g_i)]`` (gates, element masks and scalings folded in), so the new adapter reproduces
        the weighted sum of the adapters' updates (and exports to plain LoRA like any adapter of this method).
        Every module gets the rank of the largest concatenation, with the unused ranks masked off (saved in
        ``rank_mask``); the new adapter is inactive until ``set_adapter(adapter_name)``. Only ``"cat"`` is
        supported (LoRA's svd/ties/dare types approximate, and need per-module ranks the configs cannot hold).
        """
        self._check_weighted_adapter_args(
            adapters, weights, adapter_name, combination_type, COMBINATION_TYPES, self.method_name,
            svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
            density=density, majority_sign_method=majority_sign_method)
        configs = [self.peft_config[a] for a in adapters]
        self._check_combinable(adapters, configs)

        parts: dict[str, list] = {}
        shortcut_names = set()
        for name, module in self.model.named_modules():
            if not isinstance(module, self.tuner_layer_cls):
                continue
            sources = [(a, w) for a, w in zip(adapters, weights) if module.has_adapter(a)]
            if not sources:
                continue
            if not hasattr(module, "base_layer"):
                shortcut_names.add(name)
            factors = []
            for adapter, weight in sources:
                # the shared gated layer's compact factors (a shortcut's own export_factors refuses to export)
                kept = GatedLoraLayer.export_factors(module, adapter)
                if kept is not None:
                    lora_a, lora_b, scaling = kept
                    factors.append((lora_a * (float(weight) * scaling), lora_b))
            parts[name] = factors
        ranks = [sum(a.shape[0] for a, _ in f) for n, f in parts.items() if n not in shortcut_names]
        shortcut_ranks = [sum(a.shape[0] for a, _ in f) for n, f in parts.items() if n in shortcut_names]
        targets = sorted(n for n in parts if n not in shortcut_names)
        config = self.combined_config(configs[0], max([1, *ranks]), max([1, *shortcut_ranks]), targets)
        config.modules_to_save = sorted({m for c in configs for m in (c.modules_to_save or [])}) or None

        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            if adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            raise
        empty = self._fill_combined(adapter_name, parts)
        self.after_weighted_fill(adapter_name, empty)
        self._copy_modules_to_save(adapters, adapter_name)

    def _check_combinable(self, adapters: list[str], configs: list) -> None:
        owner = f"{self.method_name} add_weighted_adapter"
        for adapter, config in zip(adapters, configs):
            if config.trainable_token_indices:
                raise ValueError(f"{owner}: adapter {adapter!r} has trainable_token_indices="
                                 f"{config.trainable_token_indices!r}, which is not allowed; only adapters without "
                                 "trainable tokens can be combined")
        for wrapper in self.model.modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                holders = [a for a in adapters if a in wrapper.modules_to_save]
                if len(holders) > 1:
                    raise ValueError(f"{owner}: adapters {holders!r} all train a copy of the same modules_to_save "
                                     "module, which is not allowed; at most one of the combined adapters may have it")

    @torch.no_grad()
    def _fill_combined(self, adapter_name: str, parts: dict[str, list]) -> list:
        empty = []
        for name, module in self.model.named_modules():
            if not (isinstance(module, self.tuner_layer_cls) and module.has_adapter(adapter_name)):
                continue
            factors = parts.get(name, [])
            rank = module._store("r")[adapter_name]
            lora_a, lora_b = module._store("A")[adapter_name], module._store("B")[adapter_name]
            mask = module._store("rank_mask")[adapter_name]
            lora_a.zero_()
            lora_b.zero_()
            mask.zero_()
            if not factors:
                empty.append(module)
                continue
            cat_a = torch.cat([a for a, _ in factors]).to(lora_a.device)
            cat_b = torch.cat([b for _, b in factors], dim=1).to(lora_b.device)
            k = cat_a.shape[0]
            if k > rank:  # cannot happen: the config's rank is the largest concatenation
                raise RuntimeError(f"{self.method_name} add_weighted_adapter: module {name!r} needs rank {k} > {rank}")
            mask[:k] = 1.0
            # the new adapter's own gate (AutoLoRA: softmax(β) = 1/rank) and scaling are divided out of A
            gate = module.gate(adapter_name)[:k].float().to(lora_a.device)
            scale = module._store("scaling")[adapter_name]
            lora_a[:k] = (cat_a / (scale * gate[:, None])).to(lora_a.dtype)
            lora_b[:, :k] = cat_b.to(lora_b.dtype)
        return empty

    @torch.no_grad()
    def _copy_modules_to_save(self, adapters: list[str], adapter_name: str) -> None:
        """The combined adapter starts from the trained copy of the (one) adapter that has each module."""
        for wrapper in self.model.modules():
            if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                holders = [a for a in adapters if a in wrapper.modules_to_save]
                if holders:
                    wrapper.modules_to_save[adapter_name].load_state_dict(
                        wrapper.modules_to_save[holders[0]].state_dict())
