"""HeteroLoRA tuner: gated LoRA candidates, optional LoRA-adapted shortcuts, proxy-driven switching."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..gated.model import GatedTuner
from .allocation import init_allocation, install_hooks
from .config import HeteroLoraConfig
from .layer import HeteroLoraLayer, HeteroLoraLinear, HeteroShortcut
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
