"""HeteroLoRA tuner: gated LoRA candidates, optional LoRA-adapted shortcuts, proxy-driven switching."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..gated.model import GatedTuner
from .allocation import init_allocation, install_hooks
from .config import HeteroLoraConfig
from .layer import (FLAG_ON, N_ALLOC, SCORE_KINDS, HeteroLoraLayer, HeteroLoraLinear, HeteroShortcut,
                    finite_score)
from .shortcuts import attach_shortcuts, remove_shortcuts


class HeteroLoraModel(GatedTuner):
    """Creates a HeteroLoRA model (use via ``get_peft_model``).

    Zhang, Zhang, Gao, Mullins, Constantinides, Zhao. Unlocking the Global Synergies in Low-Rank
    Adapters. arXiv:2406.14956 (2024).

    Every target module becomes a candidate LoRA module; ``config.shortcuts`` adds LoRA-adapted
    shortcuts to every transformer block (hooks, no model code edited). A zero-cost proxy decides
    which ``round(budget · n)`` candidates are switched on — once (static) or every
    ``realloc_every`` steps (dynamic) — by itself in any training loop (``allocation.py``).
    ``export_lora`` writes the switched-on LoRA modules as a plain LoRA adapter; a switched-on
    shortcut can be neither merged nor exported (it has no base weight), which raises.
    """

    prefix: str = "hetlr_"
    method_name = "HeteroLoRA"
    tuner_layer_cls = HeteroLoraLayer
    linear_cls = HeteroLoraLinear

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        config: HeteroLoraConfig = self.peft_config[adapter_name]
        if config.shortcuts:
            from .shortcuts import find_blocks

            find_blocks(model)  # unsupported architecture: fail before anything is injected
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if config.shortcuts:
            attach_shortcuts(model, config, adapter_name, self.active_adapters)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        init_allocation(model, adapter_name)
        install_hooks(model)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Older versions saved ``proxy_last`` as NaN before the first allocation: load such files with the
        finite representation (0; "no score yet" is read from the allocation count), so the adapter never
        holds, or re-saves, a non-finite value."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        score_keys = tuple(f"{cls.prefix}{kind}." for kind in SCORE_KINDS)
        for key, value in remapped.items():
            if any(k in key for k in score_keys) and value.is_floating_point() and not torch.isfinite(value).all():
                remapped[key] = finite_score(value)
        return remapped

    # ----- weighted combination (add_weighted_adapter, see GatedTuner) -----------------------------
    def _check_combinable(self, adapters: list[str], configs: list) -> None:
        super()._check_combinable(adapters, configs)
        kinds = {tuple(c.shortcuts) for c in configs}
        if len(kinds) > 1:
            raise ValueError(f"HeteroLoRA add_weighted_adapter: adapters {list(adapters)!r} have different shortcuts "
                             f"({', '.join(repr(list(k)) for k in kinds)}), which is not allowed; only adapters with "
                             "the same shortcut kinds can be combined")

    def combined_config(self, config: HeteroLoraConfig, rank: int, shortcut_rank: int, target_modules: list[str]):
        """The allocations were made by the combined adapters: every candidate with a kept rank stays on
        (budget 1, allocated at wrap time, no scoring window); shortcuts get the largest shortcut concatenation."""
        combined = super().combined_config(config, rank, shortcut_rank, target_modules)
        return dataclasses.replace(combined, shortcut_r=shortcut_rank, shortcut_alpha=float(shortcut_rank),
                                   budget=1.0, proxy="constant", mode="static")

    @torch.no_grad()
    def after_weighted_fill(self, adapter_name: str, empty_layers: list) -> None:
        """Candidates no combined adapter had switched on stay off (and are recorded so in the allocation)."""
        for layer in empty_layers:
            layer.set_on(adapter_name, False)
            flags = layer._store("hist_flags")[adapter_name]
            slot = (int(layer._store("state")[adapter_name][N_ALLOC]) - 1) % flags.numel()
            flags[slot] = int(flags[slot]) & ~FLAG_ON

    # ----- shortcuts cannot be merged into base weights --------------------------------------------
    def _shortcuts(self):
        return [m for m in self.model.modules() if isinstance(m, HeteroShortcut)]

    def _refuse_merging_shortcuts(self, adapter_names: Optional[list[str]]) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for module in self._shortcuts():
            module._refuse_if_on(names, "merged into the base weights")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._refuse_merging_shortcuts(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            self._refuse_merging_shortcuts(adapter_names)
        remove_shortcuts(self.model)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)
